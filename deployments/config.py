"""Typed arguments of the Serve application, validated once at the edge by ``deployments.app:build_app``.

These are the ``args:`` of an application in a Serve config (serve/*.yaml, the Helm chart's serveConfigV2).
Per-deployment scaling (replicas, autoscaling, resources) is not here: it belongs to the Serve config's
``deployments:`` section, which Serve applies on top of the code's defaults.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """A base model that requests may name in ``base_model``."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$", description="Public name used in requests.")
    base_model: str = Field(description="Hub repo id, local directory/.safetensors file, or s3:// URI.")
    loras: dict[str, str] = Field(
        default_factory=dict, description="LoRAs requests may use with this model: name -> weights reference."
    )
    controlnets: dict[str, str] = Field(
        default_factory=dict,
        description="Extra spatial ControlNets requests may add in `controls`: control type (pose, canny, depth; "
        "the map is derived from a photo) or another name (a ready map only) -> weights reference. Loaded and "
        "evicted with the model.",
    )
    megapixel_steps_per_s: float | None = Field(
        None, gt=0,
        description="Measured speed of one replica on this model: (width x height / 1e6) x steps x num_images per "
        "second. A request whose cost needs longer than its deadline leaves is refused up front (422 too_costly). "
        "None: no cost check.",
    )
    overhead_s: float = Field(0.0, ge=0, description="Fixed seconds per request on top of the cost (encoding, "
                              "VAE decoding), used with megapixel_steps_per_s.")


class BatchConfig(_Strict):
    max_batch_size: int = Field(4, ge=1, le=64, description="Requests merged into one denoising batch at most.")
    batch_wait_timeout_s: float = Field(0.05, ge=0, le=10, description="How long a batch waits to fill.")


class PreprocessorConfig(_Strict):
    """The models that derive control maps from a photo (canny needs none), on CPU: each FaceAnalyzer replica loads
    those of the control types its models offer when it starts (not ready until they load)."""

    depth: str = Field("Intel/dpt-hybrid-midas", description="transformers DPT depth model: hub id, dir or s3://.")
    pose: str = Field("yzd-v/DWPose", description="DWPose ONNX files (yolox_l.onnx, dw-ll_ucoco_384.onnx): hub "
                      "id, dir or s3://.")


class SafetyConfig(_Strict):
    """The output safety filter run on every generated image (docs/api.md, "Safety checker")."""

    enabled: bool = Field(False, description="Check every image with the safety checker.")
    model: str = Field("CompVis/stable-diffusion-safety-checker",
                       description="diffusers StableDiffusionSafetyChecker weights: hub id, dir or s3://.")
    action: Literal["blur", "refuse"] = Field(
        "blur", description="blur: flagged images come back blurred and marked in `nsfw`; refuse: a result whose "
        "images are all flagged is answered 422 unsafe_output (flagged images of a mixed result are blurred).")
    allow_disable: bool = Field(False, description="Requests may turn the checker off with safety_checker: false.")


class Limits(_Strict):
    """Bounds on client input; every one is also published in the OpenAPI schema."""

    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64, description="Refused before full decoding.")
    max_faces: int = Field(4, ge=1, le=16, description="Most reference photos per request.")
    max_prompt_chars: int = Field(2000, ge=1)
    max_num_images: int = Field(4, ge=1, le=16)
    max_steps: int = Field(100, ge=1, le=1000)
    max_controls: int = Field(3, ge=0, le=8, description="Most extra ControlNets (`controls`) per request.")
    min_side: int = Field(64, ge=8)
    max_side: int = Field(2048, ge=64)


class AuthConfig(_Strict):
    enabled: bool = Field(False, description="Require 'Authorization: Bearer <key>' on /v1 routes.")
    key_hashes_env: str = Field(
        "INSTANTID_API_KEY_HASHES",
        description="Env var holding comma-separated 'name:sha256hex' entries; when <name>_FILE is set, that file "
        "is read instead and re-read so rotations reach running replicas (a mounted secret).",
    )
    rate_per_s: float = Field(2.0, gt=0, description="Token-bucket refill per API key.")
    burst: int = Field(10, ge=1, description="Token-bucket size per API key.")
    max_in_flight: int = Field(
        8, ge=0, description="Calls of one API key in flight on one Ingress replica at most (long ones: Prefer: "
        "wait, event streams, /v1/generate); past it 429 too_many_in_flight with Retry-After. 0: no bound.")
    admin_keys: list[str] = Field(
        default_factory=list,
        description="Key names (the 'name' of key_hashes_env entries) with the operators' scope: they see, use "
        "and delete every key's identities. Any other key sees only the identities it created.",
    )


class WebhookConfig(_Strict):
    """Outbound webhook calls (the final job, POSTed once it ends). Calls to arbitrary URLs from inside the
    cluster are an SSRF hole: only hosts listed here are called, anything else is refused at submit (422)."""

    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names (exact, or '*.example.com' for its subdomains) webhooks may call; empty: "
        "webhooks are refused.")
    secret_env: str = Field("INSTANTID_WEBHOOK_SECRET", description="Env var holding the HMAC-SHA256 signing "
                            "secret; unset: webhooks are refused.")
    timeout_s: float = Field(10.0, gt=0, le=60, description="Per-attempt timeout.")
    max_attempts: int = Field(4, ge=1, le=10, description="Attempts per webhook (backoff 1, 2, 4... s).")
    backoff_s: float = Field(1.0, ge=0, le=60, description="First retry delay; doubles each retry.")
    allow_http: bool = Field(False, description="Allow plain http:// webhook URLs (tests, in-cluster hooks).")


class JobsConfig(_Strict):
    """Asynchronous jobs (POST /v1/jobs, the Replicate surface): where records live and how much is queued."""

    enabled: bool = Field(True, description="false: no job routes (404) and no job workers; the one way to run "
                          "several Ingress replicas without a shared store.")
    redis_url: str | None = Field(
        None, description="redis://[:password@]host:port/db holding job records and the queue. None: the env var "
        "named by redis_url_env, else an in-process store (one Ingress replica only; records die with it).")
    redis_url_env: str = Field("INSTANTID_REDIS_URL", description="Env var read when redis_url is not set.")
    key_prefix: str = Field("instantid:", description="Prefix of every Redis key (several services, one Redis).")
    max_queued: int = Field(256, ge=1, description="Jobs waiting to start; past it submit answers 503 queue_full.")
    concurrency: int = Field(4, ge=1, le=256, description="Jobs each Ingress replica runs at once while the "
                             "Generator's autoscaling policy publishes no capacity (docs/jobs.md).")
    max_running_per_replica: int = Field(64, ge=1, le=1024, description="Jobs one Ingress replica runs at once at "
                                         "most when the capacity is published (all replicas together: it).")
    max_result_bytes: int = Field(24 * 2**20, ge=2**20, description="A job's result (JSON) at most: an inline "
                                  "result that could be larger goes to S3 (output_bucket set) or is refused at "
                                  "submit (422 result_too_large).")
    max_jobs_per_key: int = Field(200, ge=1, description="Jobs one API key has stored (any status, until they "
                                  "expire) at most; past it 429 too_many_jobs.")
    max_active_per_key: int = Field(32, ge=1, description="Jobs of one API key queued or running at most; past it "
                                    "429 too_many_jobs (one key cannot fill the queue for all).")
    result_ttl_s: int = Field(3600, ge=60, description="Finished jobs (results included) expire after this.")
    lease_s: float = Field(15.0, ge=1, description="A running job whose replica stops renewing its lease this long "
                           "is taken over by another replica.")
    max_attempts: int = Field(2, ge=1, le=5, description="Runs of one job at most: a job whose Generator or "
                              "Ingress replica died is retried until this, then failed with the reason.")
    progress_interval_s: float = Field(0.25, ge=0.05, description="Progress updates per job at most this often.")
    webhooks: WebhookConfig = Field(default_factory=WebhookConfig)


class CompileConfig(_Strict):
    """Compiled serving (instantid.optimize.ServingPlan): on at replica start, every planned graph is compiled and
    run once before the replica reports ready; other shapes, LoRA requests and everything after a compile failure
    run eager (logged, counted in instantid_compile_fallbacks). For GPUs; off on the CPU."""

    enabled: bool = Field(False, description="optimize() + warm-up of every bucket at replica start.")
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    backend: Literal["inductor", "eager"] = Field(
        "inductor", description="'eager': dynamo captures and guards but runs the graphs as they are (tests).")
    cache_dir: str | None = Field("~/.cache/instantid/inductor", description="Inductor's kernel cache: on the "
                                  "model cache volume, only a node's first replica compiles.")
    batch_buckets: list[int] = Field([2, 4, 8], min_length=1, description="Denoising rows per graph "
                                     "(guidance doubles a request's images); batches are padded up to one.")
    sizes: list[tuple[int, int]] = Field([(1024, 1024)], min_length=1, description="(width, height) compiled.")


class AppArgs(_Strict):
    """Everything ``build_app`` needs; ``serve build`` writes these under the application's ``args``."""

    profile: Literal["tiny", "real"] = Field(
        "real",
        description="'tiny' builds a random-weight bundle under tiny_dir on first start (noise images: plumbing "
        "only); 'real' loads the configured weights.",
    )
    tiny_dir: str = Field("~/.cache/instantid/tiny", description="Where the tiny profile keeps its bundle.")
    instantid: str = Field("InstantX/InstantID", description="IdentityNet + ip-adapter.bin: hub id, dir or s3://.")
    face_model: str = Field("antelopev2", description="insightface pack: a name under the insightface root, "
                            "a directory, a hub repo id, or s3://. InstantID's adapter was trained on antelopev2 "
                            "embeddings: a pack with another recogniser loads but loses the identity.")
    models: list[ModelSpec] = Field(
        default_factory=lambda: [ModelSpec(name="sdxl", base_model="stabilityai/stable-diffusion-xl-base-1.0")],
        min_length=1,
    )
    default_model: str | None = Field(None, description="Model used when a request names none (default: first).")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: float16 on CUDA, float32 on CPU."
    )
    max_models_per_replica: int = Field(2, ge=1, le=8, description="LRU size of the per-replica model cache.")
    batch: BatchConfig = Field(default_factory=BatchConfig)
    identity_store: str = Field(
        "~/.cache/instantid/identities", description="A local directory or s3://bucket/prefix."
    )
    output_bucket: str | None = Field(None, description="s3://bucket/prefix for delivery='s3'.")
    presign_expiry_s: int = Field(3600, ge=60, le=7 * 24 * 3600)
    request_timeout_s: float = Field(300.0, gt=0, description="A request past this gets 504.")
    limits: Limits = Field(default_factory=Limits)
    trusted_proxies: list[str] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"],
        description="Addresses (CIDRs) of the proxies in front of the Ingress whose X-Forwarded-For is believed: "
        "the client is the first entry from the right that is not one of them. Default: our HAProxy on the node's "
        "loopback. Behind ingress-nginx add its pods' range. A peer outside the list is the client itself.")
    auth: AuthConfig = Field(default_factory=AuthConfig)
    preprocessors: PreprocessorConfig = Field(default_factory=PreprocessorConfig)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    compile: CompileConfig = Field(default_factory=CompileConfig)

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        import ipaddress

        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {cidr!r} is not an address or CIDR") from None
        return value

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        return models

    @model_validator(mode="after")
    def _default_known(self) -> "AppArgs":
        if self.default_model is None:
            self.default_model = self.models[0].name
        elif self.default_model not in {m.name for m in self.models}:
            raise ValueError(f"default_model {self.default_model!r} is not one of the configured models")
        return self

    def model(self, name: str | None) -> ModelSpec:
        wanted = name or self.default_model
        for spec in self.models:
            if spec.name == wanted:
                return spec
        raise KeyError(wanted)
