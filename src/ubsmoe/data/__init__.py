"""Task data: BIG-bench and LLM-Adapters commonsense tasks as multiple-choice examples, prompts, partitions."""

from ubsmoe.data.bigbench import (
    BIGBENCH_VERSION,
    BigBenchArchiveError,
    BigBenchDownloadError,
    BigBenchError,
    UnknownBigBenchTaskError,
    available_tasks,
    bigbench_sdist,
    bigbench_task_path,
    bigbench_task_paths,
    clear_bigbench_cache,
    load_bigbench_task,
)
from ubsmoe.data.commonsense import (
    MIXES,
    TASKS,
    CommonsenseDataError,
    list_tasks,
    load_file,
    load_mix,
    load_task,
    split_train_test,
)
from ubsmoe.data.multiple_choice import MultipleChoice, from_bigbench, from_llm_adapters
from ubsmoe.data.partition import example_labels, label_histograms, mean_max_label_share, partition
from ubsmoe.data.prompts import IGNORE_INDEX, collate, encode_for_training, pad_token_id

__all__ = [
    "BIGBENCH_VERSION",
    "IGNORE_INDEX",
    "MIXES",
    "TASKS",
    "BigBenchArchiveError",
    "BigBenchDownloadError",
    "BigBenchError",
    "CommonsenseDataError",
    "MultipleChoice",
    "UnknownBigBenchTaskError",
    "available_tasks",
    "bigbench_sdist",
    "bigbench_task_path",
    "bigbench_task_paths",
    "clear_bigbench_cache",
    "collate",
    "encode_for_training",
    "example_labels",
    "from_bigbench",
    "from_llm_adapters",
    "label_histograms",
    "list_tasks",
    "load_bigbench_task",
    "load_file",
    "load_mix",
    "load_task",
    "mean_max_label_share",
    "pad_token_id",
    "partition",
    "split_train_test",
]
