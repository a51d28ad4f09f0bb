"""Configuration of the model and the training loop (pydantic only: the CLI reads it without loading torch)."""

from pydantic import BaseModel, ConfigDict, Field


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
    eval_batch_size: int = Field(16, ge=1, description="Sequences per forward pass when the gates evaluate losses.")
    queue_windows: int = Field(64, ge=1, description="Packed windows ingest may hold ready ahead of training (the bounded queue: backpressure on the source).")  # 8 batches of 8: the learner never waits while the stream has data
    seed: int = Field(0, description="Seed of torch in the learner (dropout, if any).")


class ModelConfig(BaseModel):
    """The language model: a tiny Llama built from these numbers, or a local directory."""

    model_config = ConfigDict(extra="forbid")

    name_or_path: str | None = Field(None, description="A local `save_pretrained` directory to load (model, and tokenizer if it has one). Empty: build a Llama from the numbers below.")
    hidden_size: int = Field(256, ge=8, description="Width of the built model.")  # 4 x 256 Llama = 5.3M params, ~3.5k tok/s on 2 CPU threads
    num_layers: int = Field(4, ge=1, description="Transformer blocks of the built model.")
    num_heads: int = Field(4, ge=1, description="Attention heads of the built model; must divide hidden_size.")
    intermediate_size: int = Field(688, ge=8, description="MLP width of the built model.")  # ~ 8/3 x hidden, Llama's ratio
    max_position_embeddings: int = Field(1024, ge=8, description="Longest sequence the built model accepts; must be >= train.seq_len.")
    seed: int = Field(0, description="Seed of the built model's initial weights.")
