"""Configuration of the replay buffer."""

from pydantic import BaseModel, ConfigDict, Field


class BufferConfig(BaseModel):
    """The replay buffer: a bounded, uniformly sampled memory of trained sequences."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field("uniform", pattern="^(uniform|weighted|stratified)$", description="Reservoir kind. `uniform`: every sequence seen so far is equally likely to be kept (Algorithm L). `weighted`: kept with probability by weight (A-ExpJ), weights from `domain_weights`. `stratified`: a quota per domain (equal, or by `domain_weights`), each stratum uniform.")
    capacity: int = Field(2048, ge=1, description="Sequences kept (each `train.seq_len` tokens); memory is capacity x seq_len x 4 bytes.")  # 2048 x 256 x 4 B = 2 MiB
    replay_fraction: float = Field(0.25, ge=0.0, lt=1.0, description="Share of every training batch drawn from the buffer instead of fresh data.")  # a few to 25 % replay curbs forgetting (Ibrahim et al. 2024)
    seed: int = Field(0, description="Seed of the buffer's own random stream (admission and sampling), so a run can be replayed exactly.")
    domain_weights: dict[str, float] = Field(default_factory=dict, description="With kind `weighted`: weight of each domain's sequences; with `stratified`: its share of the capacity. > 0; domains not named weigh 1.")
    shard_mb: int = Field(64, ge=1, description="The buffer is checkpointed in safetensors shards of at most this many MiB, each hashed in the manifest.")
    dedup: bool = Field(False, description="Suppress a sequence identical (by content hash) to one the buffer holds.")  # off: hashing every offer costs what Algorithm L saves
