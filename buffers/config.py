"""Configuration of the replay buffer and of how much of each batch it supplies."""

from pydantic import BaseModel, ConfigDict, Field, model_validator

PROBLEM_SEPARATOR = "\n  "  # a validator's several problems: one line each in a ConfigError, counted one by one


class BufferConfig(BaseModel):
    """The replay buffer: a bounded, uniformly sampled memory of trained sequences."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field("uniform", pattern="^(uniform|weighted|stratified)$", description="Reservoir kind. `uniform`: every sequence seen so far is equally likely to be kept (Algorithm L). `weighted`: kept with probability by weight (A-ExpJ), weights from `domain_weights` or the record field `weight_field`. `stratified`: a quota per domain (equal, or by `domain_weights`), each stratum uniform.")
    capacity: int | None = Field(2048, ge=1, description="Sequences kept (each `train.seq_len` tokens); memory is capacity x seq_len x 4 bytes. Null when the buffer is sized by `capacity_tokens`.")  # 2048 x 256 x 4 B = 2 MiB
    capacity_tokens: int | None = Field(None, ge=1, description="Size the buffer in tokens instead: it keeps capacity_tokens // train.seq_len sequences. Set `capacity` to null when you use it.")  # e.g. 50_000_000: ~2.5 % replay of a 2B-token stream
    replay_fraction: float = Field(0.25, ge=0.0, lt=1.0, description="Share of every training batch drawn from the buffer instead of fresh data.")  # a few to 25 % replay curbs forgetting (Ibrahim et al. 2024)
    replay_boost: float | None = Field(None, ge=0.0, lt=1.0, description="Replay share right after the domain mix of the fresh stream shifts; it falls back linearly to `replay_fraction` over `boost_steps` steps. Null: never boosted.")  # e.g. 0.5: the old domains are most at risk just after a shift
    boost_steps: int = Field(200, ge=1, description="Steps over which a boost falls back to `replay_fraction`.")  # ~ one gate interval's worth of steps, a few times over
    shift_window: int = Field(64, ge=1, description="Fresh sequences in each of the two windows compared to detect a shift of the domain mix.")  # 8 steps of 8 sequences: long enough not to fire on noise
    shift_threshold: float = Field(0.5, gt=0.0, le=1.0, description="Total variation distance between the domain mix of the last `shift_window` fresh sequences and the window before that counts as a shift.")  # 0.5: half the stream changed domain
    seed: int = Field(0, description="Seed of the buffer's own random stream (admission and sampling), so a run can be replayed exactly.")
    domain_weights: dict[str, float] = Field(default_factory=dict, description="With kind `weighted`: weight of each domain's sequences; with `stratified`: its share of the capacity. > 0; domains not named weigh 1.")
    weight_field: str | None = Field(None, min_length=1, description="With kind `weighted`: a numeric field of each JSON record (e.g. `quality`) that is the document's weight (finite, >= 0; 0 is never replayed). Records without it weigh their domain's weight; a record with a bad value is dead-lettered as bad_weight.")
    shard_mb: int = Field(64, ge=1, description="The buffer is checkpointed in safetensors shards of at most this many MiB, each hashed in the manifest.")
    dedup: bool = Field(False, description="Suppress a sequence identical (by content hash) to one the buffer holds.")  # off: hashing every offer costs what Algorithm L saves

    @model_validator(mode="after")
    def _consistent(self) -> "BufferConfig":
        problems = []
        if (self.capacity is None) == (self.capacity_tokens is None):
            problems.append("set exactly one of buffer.capacity (sequences) and buffer.capacity_tokens (tokens); set the other to null")
        if any(w <= 0 for w in self.domain_weights.values()):
            problems.append(f"buffer.domain_weights must all be > 0, got {self.domain_weights}")
        if self.weight_field is not None and self.kind != "weighted":
            problems.append(f"buffer.weight_field needs buffer.kind: weighted (it is {self.kind!r})")
        if self.replay_boost is not None and self.replay_boost < self.replay_fraction:
            problems.append(f"buffer.replay_boost ({self.replay_boost}) is below buffer.replay_fraction ({self.replay_fraction}); raise it or set it to null")
        if problems:
            raise ValueError(PROBLEM_SEPARATOR.join(problems))
        return self

    def sequences(self, seq_len: int) -> int:
        """How many sequences of ``seq_len`` tokens the buffer keeps."""
        return self.capacity if self.capacity is not None else self.capacity_tokens // seq_len
