"""The typed schema: every section of an experiment configuration and `ExperimentConfig` itself.

Each section forbids unknown keys; the validators raise `_Problems` that `ubsmoe.config.errors` turns
into one line per problem. The method's semantics (K from the budgets, the mechanisms it uses) come
from its class (`ExperimentConfig.method_class`), imported lazily: this module imports no torch.
"""

from __future__ import annotations

import math
import typing
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ubsmoe.config.errors import ConfigError, _bounds, _is_int_field, _Problems, _problems_of, _show

if TYPE_CHECKING:
    from ubsmoe.methods import Method
    from ubsmoe.models.moefication import MoEficationConfig
    from ubsmoe.moe.config import UBSMoEConfig

__all__ = ["DEFAULT_TASKS", "EMBEDDED_MODEL", "DataSection", "ExperimentConfig", "Tier"]

# ---- vocabulary --------------------------------------------------------------------------------
ExpertTarget = Literal["gate", "up", "down"]  # = ubsmoe.moe.config.LORA_TARGETS (a test keeps them equal)
RhoForm = Literal["complement", "inverse"]  # = ubsmoe.moe.config.RHO_FORMS
PGSpace = Literal["gradient", "update"]  # = ubsmoe.moe.config.PG_SPACES
Implementation = Literal["auto", "grouped_mm", "eager"]  # = ubsmoe.moe.config.IMPLEMENTATIONS
LoraProjection = Literal["auto", "rows", "tokens"]  # = ubsmoe.moe.config.LORA_PROJECTIONS

EMBEDDED_MODEL = "embedded"
DEFAULT_TASKS = (
    "social_iqa",
    "winowhy",
    "navigate",
    "hyperbaton",
    "movie_recommendation",
    "ruin_names",
    "date_understanding",
    "analogical_similarity",
)
"""BIG-bench multiple-choice tasks of the embedded default: the ones dense LoRA fine-tuning of the default model
lifts clearly above chance and above the majority answer (benchmarks/task_selection.py; docs/models.md), plus
social_iqa (the Commonsense-15K task BIG-bench carries)."""


# ---- sections ----------------------------------------------------------------------------------
def _is_number_annotation(annotation: Any) -> bool:
    """Whether a field's annotation admits an int or float (`float`, `int | None`, `list[int] | None` ...)."""
    if annotation in (int, float):
        return True
    return any(_is_number_annotation(arg) for arg in typing.get_args(annotation))


class _Section(BaseModel):
    # allow_inf_nan=False: every float field must be finite (`.inf`, `.nan`, "inf" are refused up front,
    # before any model is loaded); the fields' own bounds add the specific ranges.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Strict numbers: YAML's `true`/`false` would otherwise become 1/0 (`budget: true` -> 1.0)."""
        field = cls.model_fields.get(info.field_name or "")
        if field is None or not _is_number_annotation(field.annotation):
            return value
        items = value if isinstance(value, list) else [value]
        if any(isinstance(item, bool) for item in items):
            kind = "an integer" if _is_int_field(field) else "a number"
            bounds = _bounds(field)
            raise ValueError(f"must be {kind}{' ' + bounds if bounds else ''}, not true/false")
        return value


class MoEficationSection(_Section):
    """MoEfication options of a dense model (mirrors `ubsmoe.models.moefication.MoEficationConfig`)."""

    num_experts: int = Field(8, ge=2, description="M routed experts per layer (K_max = M)")
    shared_fraction: float = Field(0.25, ge=0.0, lt=1.0)
    grouping: Literal["coactivation", "gate_kmeans", "contiguous"] = "coactivation"
    router: Literal["ridge", "centroid"] = "ridge"
    ridge_lambda: float = Field(0.1, ge=0.0)
    router_logit_std: float | None = Field(1.0, gt=0.0)
    calibration_tokens: int = Field(8192, ge=1)
    kmeans_iterations: int = Field(30, ge=1)
    seed: int = 0
    recovery: bool = False
    recovery_tokens: int = Field(8192, ge=1)
    recovery_steps: int = Field(200, ge=1)
    recovery_batch_size: int = Field(256, ge=1)
    recovery_lr: float = Field(1e-4, gt=0.0)
    recovery_top_ks: list[int] | None = None
    recovery_train_shared: bool = True

    @model_validator(mode="after")
    def _top_ks(self) -> MoEficationSection:
        ks = self.recovery_top_ks
        if ks is not None and (not ks or not all(1 <= k <= self.num_experts for k in ks)):
            raise _Problems(
                [
                    (
                        "recovery_top_ks",
                        ks,
                        f"must be a non-empty list of integers in [1, {self.num_experts}] (num_experts)",
                    )
                ]
            )
        return self


class ModelSection(_Section):
    name: str = Field(
        EMBEDDED_MODEL, min_length=1, description="'embedded', a local model folder or a Hugging Face hub id"
    )
    revision: str | None = Field(
        None,
        min_length=1,
        description="branch, tag or commit of a hub id (null = main); not for local folders or 'embedded'",
    )
    kind: Literal["native", "dense"] | None = Field(
        None, description="native MoE, or dense (MoEfied); None = inferred when the model is loaded"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    moefication: MoEficationSection = Field(default_factory=MoEficationSection)

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        if value is not None and any(c.isspace() for c in value):
            raise ValueError("must be a branch, tag or commit of the hub repository (no spaces)")
        return value

    @model_validator(mode="after")
    def _embedded_kind(self) -> ModelSection:
        if self.name == EMBEDDED_MODEL and self.kind == "native":
            raise _Problems([("kind", self.kind, "must be 'dense' or null for the embedded model (it is MoEfied)")])
        if self.name == EMBEDDED_MODEL and self.revision is not None:
            raise _Problems([("revision", self.revision, "must be null for the embedded model (it is not a hub id)")])
        return self

    @property
    def is_moefied(self) -> bool:
        """Known to be a dense model turned into an MoE (so K_max = moefication.num_experts)."""
        return self.name == EMBEDDED_MODEL or self.kind == "dense"


class Tier(_Section):
    budget: float = Field(gt=0.0, le=1.0, description="compute budget beta in (0, 1]")
    clients: int = Field(ge=1, description="number of clients with this budget")


def _default_tiers() -> list[Tier]:
    return [Tier(budget=b, clients=2) for b in (0.25, 0.5, 0.75, 1.0)]


class MoESection(_Section):
    num_candidates: int | None = Field(None, ge=1, description="N_p; null = 2 * K_max clipped to M")
    normalize_gates: bool | None = Field(None, description="null = the model family's convention")
    router_trainable: bool = False
    implementation: Implementation = "auto"
    lora_projection: LoraProjection = Field(
        "auto",
        description="hidden-side expert LoRA per routed row or per token over all experts; auto = tokens when MoEfied",
    )
    tiers: list[Tier] = Field(default_factory=_default_tiers)

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, tiers: list[Tier]) -> list[Tier]:
        if not tiers:
            raise ValueError("must list at least one tier {budget, clients}")
        budgets = [t.budget for t in tiers]
        if len(set(budgets)) != len(budgets):
            raise ValueError(f"budgets {budgets} must be distinct (merge tiers by adding up their clients)")
        return tiers


class DMRSection(_Section):
    enabled: bool = True
    zeta: float = Field(0.9, ge=0.0, le=1.0, description="server momentum of phi")
    eps: float = Field(1e-6, gt=0.0)
    phi_min: float = -1.0
    phi_max: float = 1.0
    range_lambda: float = Field(1e-2, ge=0.0, description="weight of the range regulariser")

    @model_validator(mode="after")
    def _range(self) -> DMRSection:
        problems = [(n, getattr(self, n), "must be a finite number") for n in ("phi_min", "phi_max")]
        problems = [p for p in problems if not math.isfinite(p[1])]
        if not problems and not self.phi_min < self.phi_max:
            problems = [("phi_min", self.phi_min, f"must be < dmr.phi_max ({self.phi_max})")]
        if problems:
            raise _Problems(problems)
        return self


class PseudoGradientSection(_Section):
    enabled: bool = True
    kappa: float = Field(
        4.0,
        ge=0.0,
        description="PG's scale; with PG in update space, 4 lowered the answer NLL at every tier against 1 on the "
        "dev split, two seeds; 16 lowered it further but cost the default run's K = 8 accuracy "
        "(docs/decisions.md); the paper's form (space: gradient) uses 1",
    )
    rho_form: RhoForm = "complement"
    space: PGSpace = Field(
        "update",
        description="update: added to the optimizer's actual updates after its step, so Adam does not "
        "renormalise it (the default: it lowered the answer NLL at every tier on the dev split, two seeds; "
        "docs/decisions.md); gradient: added to the expert gradients before the optimizer (the paper's form)",
    )


class LoRASection(_Section):
    rank: int = Field(8, ge=1, description="uniform expert rank (r_max of the rank baselines)")
    alpha: float = Field(16.0, gt=0.0)
    targets: list[ExpertTarget] = Field(default_factory=lambda: ["gate", "up", "down"])

    @field_validator("targets")
    @classmethod
    def _distinct(cls, names: list[str]) -> list[str]:
        if not names or len(set(names)) != len(names):
            raise ValueError("must be a non-empty list of distinct names")
        return names


class DataSection(_Section):
    source: Literal["bigbench", "commonsense"] = "bigbench"
    path: str | None = Field(None, description="folder of the LLM-Adapters files (source 'commonsense')")
    prompt_format: Literal["options", "instruction"] = Field(
        "options",
        description="source 'commonsense': options = the question with each option's text as the answer; "
        "instruction = LLM-Adapters' template and 'the correct answer is answerN' targets (the paper's protocol)",
    )
    tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_TASKS))
    partition: Literal["iid", "dirichlet"] = "dirichlet"
    dirichlet_alpha: float = Field(0.5, gt=0.0)
    partition_label: Literal["task", "task_answer"] = Field(
        "task", description="what Dirichlet skews over: each example's task, or its (task, answer index) pair"
    )
    seed: int = Field(0, description="seeds the split and the partition, separately from the model seed")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of each task held out for evaluation")
    max_train_examples_per_task: int | None = Field(
        200, ge=1, description="a seeded sample of each task's training split; null = all"
    )
    max_length: int = Field(256, ge=8, description="tokens per training example (longer ones are truncated)")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks: list[str]) -> list[str]:
        if not tasks or len(set(tasks)) != len(tasks) or not all(t.strip() for t in tasks):
            raise ValueError("must be a non-empty list of distinct task names")
        return tasks

    @model_validator(mode="after")
    def _path(self) -> DataSection:
        if self.source == "commonsense" and not self.path:
            raise _Problems([("path", self.path, "is required when data.source is 'commonsense'")])
        if self.source != "commonsense" and self.prompt_format != "options":
            raise _Problems(
                [
                    (
                        "prompt_format",
                        self.prompt_format,
                        "'instruction' needs data.source 'commonsense' (LLM-Adapters records)",
                    )
                ]
            )
        return self


class OptimizerSection(_Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0, description="learning rate of the first round")
    min_lr: float = Field(1e-4, ge=0.0, description="learning rate of the last round (cosine schedule)")
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="per-round cosine from lr to min_lr over the rounds (FlowerTune), or constant"
    )
    grad_clip: float | None = Field(1.0, gt=0.0, description="max gradient norm; null = no clipping")

    @model_validator(mode="after")
    def _lrs(self) -> OptimizerSection:
        if self.min_lr > self.lr:
            raise _Problems([("min_lr", self.min_lr, f"must be <= federation.optimizer.lr ({self.lr})")])
        if self.lr * self.weight_decay >= 1.0:  # decoupled (AdamW) or L2 (SGD) decay: w <- w * (1 - lr * wd)
            raise _Problems(
                [
                    (
                        "weight_decay",
                        self.weight_decay,
                        f"times federation.optimizer.lr ({self.lr}) must be < 1 (each step scales the "
                        "weights by 1 - lr * weight_decay, which would zero or flip them)",
                    )
                ]
            )
        return self


class FederationSection(_Section):
    clients: int | None = Field(None, ge=1, description="null = the clients of moe.tiers; if set, must match")
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of clients sampled per round")
    rounds: int = Field(3, ge=1)
    local_steps: int = Field(4, ge=1)
    batch_size: int = Field(8, ge=1)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    max_update_norm: float | None = Field(
        100.0,
        gt=0.0,
        description="the server drops a client update whose adapter-delta norm exceeds it; null = no bound",
    )


class BaselinesSection(_Section):
    """Hyper-parameters used only by baselines (their papers' usual values; not tuned here)."""

    load_balance_coef: float = Field(0.01, ge=0.0, description="SMoE-LLB: weight of the Switch load-balancing loss")
    hetlora_penalty: float = Field(1e-3, ge=0.0, description="HetLoRA: weight of the rank self-pruning penalty")
    hetlora_gamma: float = Field(
        0.5, gt=0.0, le=1.0, description="HetLoRA: the tail starts at floor(gamma * r); pruning keeps that many"
    )
    hetlora_prune_ratio: float = Field(
        0.05, ge=0.0, le=1.0, description="HetLoRA: prune when the tail holds less than this share of the adapter"
    )
    florist_energy: float = Field(0.9, gt=0.0, le=1.0, description="FLoRIST: singular-value energy threshold tau")
    a3smoe_exponent: float = Field(1.0, ge=0.0, description="A3SMoE: exponent t of the activation frequency")


class EvaluationSection(_Section):
    protocol: Literal["loglik", "generate"] = "loglik"
    examples_per_task: int | None = Field(10, ge=1, description="held-out examples per task; null = all")
    split: Literal["all", "dev", "test"] = Field(
        "all", description="held-out examples evaluated: all, or the dev / test half (disjoint, seeded by data.seed)"
    )
    dev_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="share of each task's held-out examples in dev")
    batch_size: int = Field(32, ge=1, description="examples per evaluation batch")
    max_new_tokens: int = Field(32, ge=1, description="protocol 'generate' only")
    every: int = Field(1, ge=1, description="evaluate every this many rounds (the last round always)")
    initial: bool = Field(True, description="also evaluate before training (round 0 of the plots)")
    heldout_tokens: int = Field(
        1024, ge=0, description="tokens of held-out BIG-bench text for perplexity per tier; 0 = skip"
    )
    measure_flops: bool = Field(
        True, description="also count training FLOPs with torch's counter (about a minute on 2 cores); false = analytic"
    )


class OutputSection(_Section):
    dir: str = Field("runs/default", min_length=1)
    keep_checkpoints: int | None = Field(2, ge=1, description="newest round checkpoints kept; null = all")
    plots: bool = True
    tensorboard: bool = Field(True, description="write TensorBoard scalars when the tensorboard package is installed")


# ---- the experiment ----------------------------------------------------------------------------
class ExperimentConfig(_Section):
    """Everything one run needs. Defaults describe the embedded default experiment."""

    method: str = Field(
        "ubsmoe", description="a method of ubsmoe.methods: built-in or registered name, or 'package.module:Class'"
    )
    method_options: dict[str, Any] = Field(
        default_factory=dict, description="hyper-parameters of a method defined outside the package"
    )
    seed: int = Field(0, description="seeds the model's trainable parts, client sampling and training")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    model: ModelSection = Field(default_factory=ModelSection)
    moe: MoESection = Field(default_factory=MoESection)
    dmr: DMRSection = Field(default_factory=DMRSection)
    pseudo_gradient: PseudoGradientSection = Field(default_factory=PseudoGradientSection)
    lora: LoRASection = Field(default_factory=LoRASection)
    data: DataSection = Field(default_factory=DataSection)
    federation: FederationSection = Field(default_factory=FederationSection)
    baselines: BaselinesSection = Field(default_factory=BaselinesSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from ubsmoe.methods.registry import is_method_name

        if not is_method_name(value):
            from ubsmoe.methods.registry import method_names

            raise ValueError(
                f"unknown; choose one of {', '.join(method_names())} or give a 'package.module:Class' path"
            )
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        problems: list[tuple[str, Any, str]] = []
        n_clients = self.num_clients
        if self.federation.clients is not None and self.federation.clients != n_clients:
            problems.append(
                ("federation.clients", self.federation.clients, f"must equal the clients of moe.tiers ({n_clients})")
            )
        if self.model.is_moefied:
            k_max = self.model.moefication.num_experts
            problems += self._candidate_problems(k_max, k_max, "model.moefication.num_experts")
        cap = self.data.max_train_examples_per_task
        if cap is not None and cap * len(self.data.tasks) < n_clients:
            problems.append(
                (
                    "data.max_train_examples_per_task",
                    cap,
                    f"gives at most {cap * len(self.data.tasks)} training examples, fewer than the {n_clients} "
                    "clients of moe.tiers; every client needs at least one",
                )
            )
        if problems:
            raise _Problems(problems)
        return self

    def _candidate_problems(self, k_max: int, num_experts: int, origin: str) -> list[tuple[str, Any, str]]:
        n_p = self.moe.num_candidates
        if n_p is None or k_max <= n_p <= num_experts:
            return []
        return [
            (
                "moe.num_candidates",
                n_p,
                f"must be in [K_max, M] = [{k_max}, {num_experts}] ({origin}); null = 2 * K_max clipped to M",
            )
        ]

    # -- derived values ---------------------------------------------------------------------------
    @property
    def num_clients(self) -> int:
        return sum(t.clients for t in self.moe.tiers)

    def method_class(self) -> type[Method]:
        """The class of `method` (`ubsmoe.methods.method_class`); ConfigError when it cannot be found."""
        from ubsmoe.methods import UnknownMethodError, method_class

        try:
            return method_class(self.method)
        except UnknownMethodError as error:
            raise ConfigError(f"method = {_show(self.method)}: {error}") from None

    def method_instance(self) -> Method:
        """The method a run uses, with its hyper-parameters (ConfigError names what is wrong with them)."""
        from ubsmoe.methods import MethodOptionsError

        try:
            return self.method_class().from_config(self)
        except (MethodOptionsError, TypeError) as error:
            raise ConfigError(f"method_options = {_show(self.method_options)}: {error}") from None

    @property
    def budgets_set_top_k(self) -> bool:
        """Whether K_c follows the budgets (else every client runs at K_max and tiers are rank tiers or labels)."""
        return self.method_class().top_k_from_budget

    def client_budgets(self) -> list[float]:
        """beta_c of every client, tiers expanded in order (client ids 0 .. num_clients - 1)."""
        return [t.budget for t in self.moe.tiers for _ in range(t.clients)]

    def client_tiers(self) -> list[int]:
        """The tier index of every client."""
        return [i for i, t in enumerate(self.moe.tiers) for _ in range(t.clients)]

    def client_top_ks(self, k_max: int) -> list[int]:
        """K_c of every client: max(1, floor(K_max * beta_c)), or K_max for everyone when the method's
        budgets do not set K (FedIT, the rank baselines)."""
        if k_max < 1:
            raise ConfigError(f"K_max = {k_max}: must be an integer >= 1")
        if not self.budgets_set_top_k:
            return [k_max] * self.num_clients
        return [max(1, math.floor(k_max * b + 1e-9)) for b in self.client_budgets()]

    def client_ranks(self) -> list[int]:
        """LoRA rank of every client: max(1, round(rank * beta_c)) when the method's budgets set the rank
        (HetLoRA, FlexLoRA, FLoRA, FLoRIST), else rank."""
        if self.method_class().rank_from_budget:
            return [max(1, round(self.lora.rank * b)) for b in self.client_budgets()]
        return [self.lora.rank] * self.num_clients

    @property
    def dmr_active(self) -> bool:
        return self.dmr.enabled and self.method_class().uses_dmr

    @property
    def pseudo_gradient_active(self) -> bool:
        return self.pseudo_gradient.enabled and self.method_class().uses_pseudo_gradient

    @property
    def range_lambda(self) -> float:
        uses = self.dmr_active and self.method_class().uses_range_regulariser
        return self.dmr.range_lambda if uses else 0.0

    def check_against_model(self, k_max: int, num_experts: int, num_examples: int | None = None) -> None:
        """Checks that need the loaded model and data; raises ConfigError naming the field.

        Args:
            k_max: the model's native top-k (M for MoEfied models).
            num_experts: M, the routed experts per layer.
            num_examples: training examples available in total (None = not known yet).
        """
        problems = [f"{p} = {_show(v)}: {m}" for p, v, m in self._candidate_problems(k_max, num_experts, "the model")]
        if not 1 <= k_max <= num_experts:
            problems.append(f"model top-k = {k_max}: must be in [1, {num_experts}] (the model's experts)")
        n = self.num_clients
        if num_examples is not None and num_examples < n:
            problems.append(
                f"moe.tiers = {n} clients: more clients than training examples ({num_examples}); "
                "use fewer clients or more data (data.tasks, data.max_train_examples_per_task)"
            )
        if problems:
            raise ConfigError(problems)

    # -- conversions ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for summary.json); `ExperimentConfig.from_dict` reads it back."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> ExperimentConfig:
        """Validate a plain dict; ConfigError (one line per problem) instead of pydantic's ValidationError."""
        if not isinstance(data, dict):
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}the configuration must be a mapping of sections, got {_show(data)}")
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise ConfigError(_problems_of(error, cls)) from None

    def ubsmoe_config(self) -> UBSMoEConfig:
        """The per-layer `ubsmoe.moe.UBSMoEConfig` (normalize_gates null -> False; the model loader applies
        the family's convention, or `moe.normalize_gates` when set)."""
        from ubsmoe.moe.config import UBSMoEConfig

        return UBSMoEConfig(
            lora_rank=self.lora.rank,
            lora_alpha=float(self.lora.alpha),
            lora_targets=tuple(self.lora.targets),
            normalize_gates=bool(self.moe.normalize_gates),
            router_trainable=self.moe.router_trainable,
            dmr=self.dmr_active,
            num_candidates=self.moe.num_candidates,
            phi_min=self.dmr.phi_min,
            phi_max=self.dmr.phi_max,
            range_lambda=self.range_lambda,
            pseudo_gradient=self.pseudo_gradient_active,
            pg_kappa=self.pseudo_gradient.kappa,
            pg_rho_form=self.pseudo_gradient.rho_form,
            pg_space=self.pseudo_gradient.space,
            implementation=self.moe.implementation,
            lora_projection=self.moe.lora_projection,
        )

    def moefication_config(self) -> MoEficationConfig:
        from ubsmoe.models.moefication import MoEficationConfig

        return MoEficationConfig.from_dict(self.model.moefication.model_dump())
