"""Configuration of the model and the training loop (pydantic only: the CLI reads it without loading torch)."""

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


def _custom_resources(value: dict[str, float]) -> dict[str, float]:
    for name, amount in value.items():
        if name in BUILTIN_RESOURCES or name.startswith("node:"):
            raise ValueError(f"{name!r} is not a custom resource: CPUs and GPUs have their own num_cpus / num_gpus fields")
        if not name or amount < 0:
            raise ValueError(f"custom resource {name!r}: {amount} must be a non-empty name with an amount >= 0")
    return value


# Custom Ray resources an actor reserves, e.g. {everlearn_gpu: 1}: a node group started with that
# resource (`ray start --resources`, the Helm chart's worker groups) is the only place it can run.
CustomResources = Annotated[dict[str, float], AfterValidator(_custom_resources)]


class TrainConfig(BaseModel):
    """The optimizer and the shape of a training batch."""

    model_config = ConfigDict(extra="forbid")

    seq_len: int = Field(256, ge=8, description="Tokens per training sequence; documents are packed end to end into sequences of this length.")
    batch_size: int = Field(8, ge=1, description="Sequences per optimizer step (fresh + replayed).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay.")  # the usual LLM pre-training value
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")  # 0.95 over 0.999: steadier under shifting data
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this value.")
    torch_threads: int = Field(2, ge=1, description="Intra-op threads of the learner's torch.")  # = cores of this 2-core machine
    num_cpus: float = Field(1.0, ge=0, description="CPUs the learner actor reserves in Ray.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs the learner actor reserves in Ray; > 0 trains on CUDA.")
    resources: CustomResources = Field(default_factory=dict, description="Custom Ray resources the learner (each data-parallel worker, and an anneal branch) reserves, e.g. {everlearn_gpu: 1} to keep it on the node group started with that resource.")
    eval_batch_size: int = Field(16, ge=1, description="Sequences per forward pass when the gates evaluate losses.")
    queue_windows: int = Field(64, ge=1, description="Packed windows ingest may hold ready ahead of training (the bounded queue: backpressure on the source).")  # 8 batches of 8: the learner never waits while the stream has data
    seed: int = Field(0, description="Seed of torch in the learner (dropout, LoRA's initial adapters).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the learner trains. auto: CUDA when num_gpus > 0 and a GPU is visible, else the CPU.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="bf16: forward and backward under bfloat16 autocast (weights and optimizer stay float32). auto: bf16 on CUDA, fp32 on the CPU.")  # CPU bf16 kernels are slower than fp32 on most CPUs
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step: the batch is split into this many parts whose gradients add up to the whole batch's (less memory, same step).")
    compile: bool = Field(False, description="Run the model through torch.compile (first steps are slow while it compiles; checkpoints are unchanged).")  # off: compiling costs minutes on small CPUs and gains little on tiny models
    compile_backend: str = Field("inductor", description="torch.compile backend when compile is on (inductor; aot_eager or eager to debug).")
    num_workers: int = Field(1, ge=1, description="Data-parallel learner workers (torch DDP through Ray Train: gloo on CPU, nccl on GPU); each takes its share of every batch.")


class LoraConfig(BaseModel):
    """LoRA adapters (peft): with ``r`` set, only the adapters train and checkpoints hold only them."""

    model_config = ConfigDict(extra="forbid")

    r: int | None = Field(None, ge=1, description="Rank of the LoRA adapters. Empty: full fine-tuning.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r).")  # peft's and the LoRA paper's common value
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input while training.")  # 0: a streaming learner sees little repetition to overfit
    target_modules: list[str] | Literal["all-linear"] | None = Field(None, description="Module names to adapt (e.g. [q_proj, v_proj]), or all-linear. Empty: peft's default for the architecture.")

    @field_validator("target_modules")
    @classmethod
    def _nonempty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("target_modules is an empty list; name modules (e.g. [q_proj, v_proj]), write all-linear, or leave it out")
        return v


class ModelConfig(BaseModel):
    """The language model: a tiny Llama built from these numbers, a local directory, or a hub id."""

    model_config = ConfigDict(extra="forbid")

    name_or_path: str | None = Field(None, description="A Hugging Face causal LM: a local `save_pretrained` directory (its tokenizer too when it has one; the byte tokenizer otherwise), or a hub id on machines that reach the hub. Empty: build a Llama from the numbers below.")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="Attention kernel: sdpa (torch's scaled_dot_product_attention, flash/memory-efficient on GPUs) or eager.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description=LoraConfig.__doc__)
    hidden_size: int = Field(256, ge=8, description="Width of the built model.")  # 4 x 256 Llama = 5.3M params, ~3.5k tok/s on 2 CPU threads
    num_layers: int = Field(4, ge=1, description="Transformer blocks of the built model.")
    num_heads: int = Field(4, ge=1, description="Attention heads of the built model; must divide hidden_size.")
    intermediate_size: int = Field(688, ge=8, description="MLP width of the built model.")  # ~ 8/3 x hidden, Llama's ratio
    max_position_embeddings: int = Field(1024, ge=8, description="Longest sequence the built model accepts; must be >= train.seq_len.")
    seed: int = Field(0, description="Seed of the built model's initial weights.")
