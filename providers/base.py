"""The provider contract: what every training/inference backend declares and implements.

The engine and the router read only the data declared here (``capabilities``), never a
provider's name. Adapters keep their vendor's wire format in private Structs and raise only
the ``ProviderError`` tree below.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

import msgspec

if TYPE_CHECKING:  # pragma: no cover - imported for annotations only
    import httpx

    from plugins.storage.base import Storage

SubjectKind = Literal["person", "style", "object"]
#: how a provider wants the prepared dataset: the zip file (it uploads it itself), a signed URL
#: of the zip, the image files, signed URLs of each image, or a local directory. The two URL
#: forms need ``server.public_base_url`` (routing skips the provider without it)
DatasetInput = Literal["zip", "zip_url", "files", "image_urls", "directory"]
ASPECT_RATIOS: frozenset[str] = frozenset({"1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3"})
OUTPUT_FORMATS: frozenset[str] = frozenset({"png", "jpg", "webp"})
#: generation parameters a provider may or may not honour (``InferenceCapabilities.honours``);
#: ``output_format`` is always honoured: the gateway re-encodes what a provider cannot produce
GENERATION_PARAMS: frozenset[str] = frozenset({"seed", "lora_strength", "guidance_scale", "num_inference_steps"})


# --------------------------------------------------------------------------- capabilities


class TrainingCapabilities(msgspec.Struct, frozen=True, kw_only=True):
    subject_kinds: frozenset[str] = frozenset({"person", "style", "object"})
    min_steps: int = 500
    max_steps: int = 3000
    min_rank: int = 8
    max_rank: int = 64
    #: False: the vendor picks the rank itself (the LoRA's ``loraRank`` is not passed on and
    #: does not make the provider ineligible)
    rank_controllable: bool = True
    dataset_input: DatasetInput = "files"
    #: the trained weights can be downloaded (the LoRA is then portable to other providers)
    produces_artifact: bool = True
    #: the vendor makes its own trigger word (the gateway swaps it into prompts)
    makes_trigger_word: bool = False


class InferenceCapabilities(msgspec.Struct, frozen=True, kw_only=True):
    #: can generate from a LoRA file trained elsewhere (a portable artifact)
    accepts_lora_file: bool = True
    max_outputs: int = 4
    aspect_ratios: frozenset[str] = ASPECT_RATIOS
    #: formats the provider produces itself; the gateway re-encodes to any other
    output_formats: frozenset[str] = OUTPUT_FORMATS
    #: which of GENERATION_PARAMS it passes on; a request that set another one is served with it
    #: ignored (recorded on the job as ``ignoredParams``); routing prefers providers honouring all
    honours: frozenset[str] = GENERATION_PARAMS
    #: key layouts of LoRA files it loads (``accepts_lora_file``)
    lora_formats: frozenset[str] = frozenset({"diffusers", "kohya"})
    #: how it reaches a portable LoRA's weights: ``any`` (it fetches or uploads them itself),
    #: ``local_file`` (a path on this machine: local storage), ``public_url`` (a signed gateway URL)
    weights_access: Literal["any", "local_file", "public_url"] = "any"


class Cost(msgspec.Struct, frozen=True, kw_only=True):
    currency: str = "USD"
    per_training: float = 0.0
    per_image: float = 0.0


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    training: TrainingCapabilities | None = None
    inference: InferenceCapabilities | None = None
    cost: Cost = Cost()
    #: the provider can call the gateway back (``POST /hooks/{provider}``)
    webhooks_in: bool = False
    #: its verified callbacks name the gateway's attempt and the provider's job id, so one can
    #: resolve a submission whose answer was lost (the engine then waits for it a bounded time)
    callbacks_name_attempts: bool = False
    #: after an ambiguous submit, the provider can find a job by the gateway's attempt id
    can_lookup: bool = False
    can_cancel: bool = False


# --------------------------------------------------------------------------- requests / results


class TrainingSpec(msgspec.Struct, frozen=True, kw_only=True):
    attempt_id: str  # unique per try; providers may use it as an idempotency key
    lora_id: str
    name: str
    subject_kind: str
    gender: str | None = None
    ethnicity: str | None = None
    age: str | None = None
    steps: int
    lora_rank: int
    trigger_word: str  # the gateway's word, already written into every caption
    team_id: str | None = None  # for fair scheduling across teams


class Dataset(msgspec.Struct, frozen=True, kw_only=True):
    """A prepared dataset: normalised images plus ``.txt`` captions (each holding the trigger word)."""

    zip_path: Path  # NNN.jpg + NNN.txt, local file
    directory: Path  # the same files unpacked, local directory
    image_count: int
    zip_url: str | None = None  # a signed, expiring gateway URL when public_base_url is set
    files: list[Path] = msgspec.field(default_factory=list)  # the NNN.jpg images, in order
    #: signed, expiring gateway URLs of those images (only for ``dataset_input: image_urls``, and
    #: only when public_base_url is set)
    image_urls: list[str] = msgspec.field(default_factory=list)


class TrainingSubmission(msgspec.Struct, frozen=True, kw_only=True):
    ref: str  # the provider's job id
    trigger_word: str | None = None  # the provider's own word, when it makes one


TrainingState = Literal["queued", "running", "succeeded", "failed"]


class TrainingStatus(msgspec.Struct, frozen=True, kw_only=True):
    state: TrainingState
    progress: float | None = None  # 0..1
    artifact_url: str | None = None  # set when succeeded and the weights are downloadable
    #: sample images of a finished training (copied into gateway storage and shown on the LoRA)
    sample_urls: list[str] = msgspec.field(default_factory=list)
    error: str | None = None
    retryable: bool = False


class LoraHandle(msgspec.Struct, frozen=True, kw_only=True):
    """What a provider needs to generate with a trained LoRA."""

    lora_id: str
    trigger_word: str  # the gateway's word
    provider_trigger_word: str | None = None  # the vendor's word, if the vendor made one
    trained_by: str | None = None  # provider that trained it
    trained_ref: str | None = None  # that provider's job id
    artifact_path: Path | None = None  # local copy of the weights (portable LoRAs)
    artifact_url: str | None = None  # a signed gateway URL of the weights, if public
    artifact_format: str | None = None  # "diffusers" | "kohya"
    artifact_key: str | None = None  # the weights' key in gateway storage (``setup.storage``)
    artifact_sha256: str | None = None


class GenerationSpec(msgspec.Struct, frozen=True, kw_only=True):
    attempt_id: str
    job_id: str
    prompt: str  # final prompt: trigger word already applied by the engine
    num_outputs: int = 1
    aspect_ratio: str = "1:1"
    width: int = 1024
    height: int = 1024
    output_format: str = "png"
    lora_strength: float = 1.0
    guidance_scale: float = 3.5
    num_inference_steps: int = 28
    seed: int | None = None
    team_id: str | None = None


class GeneratedImage(msgspec.Struct, frozen=True, kw_only=True):
    data: bytes | None = None  # inline bytes ...
    url: str | None = None  # ... or a URL fetched through ``Provider.fetch_file``


GenerationState = Literal["queued", "running", "succeeded", "failed"]


class GenerationStatus(msgspec.Struct, frozen=True, kw_only=True):
    state: GenerationState
    ref: str | None = None
    progress: float | None = None
    images: list[GeneratedImage] = msgspec.field(default_factory=list)
    error: str | None = None
    retryable: bool = False


class CallbackEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A verified inbound callback: which provider job it is about. The gateway then asks the
    provider for the job's status (the callback body itself is not trusted beyond the ref).

    ``attempt_id``, when the provider can tell it (e.g. from the callback URL it was given),
    lets a callback resolve an ambiguous submission whose answer was lost."""

    ref: str | None = None
    kind: Literal["training", "generation"] = "training"
    attempt_id: str | None = None
    #: an unverifiable callback (the vendor signs nothing): it only makes the named attempt's poll
    #: due now (rate-limited); nothing in it is trusted
    hint: bool = False


# --------------------------------------------------------------------------- errors


class ProviderError(Exception):
    """Base of every error a provider raises. ``retryable`` drives failover."""

    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable  # type: ignore[misc]


class ProviderTimeout(ProviderError):
    """No answer in time from a call that bills nothing (a status GET, an upload ticket): retry."""

    retryable = True


class ProviderOutcomeUnknown(ProviderError):
    """The final, billable request (the training or generation submit) may have been accepted:
    it was sent, but nothing came back that says either way (a timeout or a dropped connection
    after sending, or a 5xx that is not the vendor's own error body, such as a 502/504 from a
    proxy). Raise it only there. The engine never resends at once: it reconciles (looks the job
    up by the attempt id where the provider can, else waits a bounded time for the provider's
    callback), and otherwise marks the attempt ``unknown`` and never sends that work there again."""

    retryable = True


class ProviderUnavailable(ProviderError):
    retryable = True


class ProviderRateLimited(ProviderError):
    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ProviderRejected(ProviderError):
    retryable = False


class ProviderAuthError(ProviderError):
    retryable = False


# --------------------------------------------------------------------------- setup + base class


@dataclass
class ProviderSetup:
    """What the gateway hands a provider when it builds it."""

    storage: "Storage"
    data_dir: Path
    public_base_url: str | None
    #: builds an httpx client for this provider (tests inject a transport through it)
    http_client: Callable[..., "httpx.AsyncClient"]
    #: shared with the engine (``gateway.imagework.ImageWorkers``): ``await image_workers.run(fn,
    #: *args)`` runs CPU-heavy image work (drawing, encoding) on low-priority threads, so the
    #: API's event loop keeps the CPU it needs; None outside a gateway (then use your own thread)
    image_workers: Any = None
    #: the instance's name in the config (``providers.<instance>``); it becomes ``Provider.name``
    #: (two accounts of one vendor are two instances of one type). None: the type's own name
    instance: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Provider(ABC):
    """A training and/or inference backend. Register the class through ``register_providers``."""

    #: the provider *type*'s name (its ``type:`` in the config); on an object, the instance's name
    name: str
    #: msgspec Struct type of this provider's config section (``providers.<instance>``)
    config_type: ClassVar[type[msgspec.Struct]]
    capabilities: Capabilities

    def __init__(self, config: Any, setup: ProviderSetup) -> None:
        self.config = config
        self.setup = setup
        if setup.instance:
            self.name = setup.instance

    def state_dir(self) -> Path:
        """This instance's own directory under the data dir: ``<type>`` for the instance named like
        its type (the default), ``<type>-<instance>`` for any other, so two instances of one type
        never share state."""
        kind = type(self).name
        return Path(self.setup.data_dir) / (kind if self.name == kind else f"{kind}-{self.name}")

    # -- training
    async def start_training(self, spec: TrainingSpec, dataset: Dataset) -> TrainingSubmission:
        raise ProviderRejected(f"{self.name} does not train")

    async def training_status(self, ref: str) -> TrainingStatus:
        raise ProviderRejected(f"{self.name} does not train")

    async def lookup_training(self, attempt_id: str) -> TrainingSubmission | None:
        """Find a submission by the gateway's attempt id (only if ``can_lookup``)."""
        return None

    async def cancel_training(self, ref: str) -> None:
        """Cancel a training. Return once the vendor confirmed it or said it had already ended;
        raise a retryable ProviderError to be asked again later (only if ``can_cancel``)."""
        return None

    # -- inference
    async def generate(self, spec: GenerationSpec, lora: LoraHandle) -> GenerationStatus:
        raise ProviderRejected(f"{self.name} does not generate")

    async def generation_status(self, ref: str) -> GenerationStatus:
        raise ProviderRejected(f"{self.name} does not generate")

    async def lookup_generation(self, attempt_id: str) -> GenerationStatus | None:
        """Find a generation by the gateway's attempt id (only if ``can_lookup``)."""
        return None

    async def cancel_generation(self, ref: str) -> None:
        """Cancel a generation that is still running (a superseded attempt); as ``cancel_training``."""
        return None

    # -- files
    async def fetch_file(self, url: str, dest: Path, *, max_bytes: int) -> None:
        """Copy a result (artifact or image) the provider pointed at into ``dest``."""
        raise ProviderRejected(f"{self.name} cannot fetch {url!r}")

    # -- callbacks
    async def verify_callback(self, headers: dict[str, str], body: bytes,
                              params: dict[str, str] | None = None) -> CallbackEvent:
        """Verify an inbound callback (``POST /hooks/{name}``); raise ProviderAuthError if it fails.

        ``headers`` has lower-cased names; ``params`` is the callback URL's query (the provider put
        it there when it gave the vendor the URL). Only called when ``capabilities.webhooks_in``."""
        raise ProviderAuthError(f"{self.name} takes no callbacks")

    # -- lifecycle
    async def start(self) -> None:
        """Begin background work (recovering trainings, scheduler threads). Called by the engine,
        so only in processes that run it; an API-only process never calls it. The constructor
        must have no side effects."""
        return None

    async def aclose(self) -> None:
        """Stop background work and release resources. Called once when the gateway closes,
        whether or not ``start()`` was called."""
        return None


ProviderFactory = type[Provider]
