"""Task data: BIG-bench multiple-choice tasks (cached from the bigbench sdist) and, later, other loaders."""

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

__all__ = [
    "BIGBENCH_VERSION",
    "BigBenchArchiveError",
    "BigBenchDownloadError",
    "BigBenchError",
    "UnknownBigBenchTaskError",
    "available_tasks",
    "bigbench_sdist",
    "bigbench_task_path",
    "bigbench_task_paths",
    "clear_bigbench_cache",
    "load_bigbench_task",
]
