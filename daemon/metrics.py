"""Prometheus metrics of a run, on a registry passed in (tests pass their own)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "everlearn"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.documents_ingested = Counter(f"{PREFIX}_documents_ingested", "Documents decoded from the stream (trained and held out).", ["domain"], registry=r)
        self.documents_held_out = Counter(f"{PREFIX}_documents_held_out", "Documents held out of training for the gates.", registry=r)
        self.documents_dead_lettered = Counter(f"{PREFIX}_documents_dead_lettered", "Records sent to the dead-letter sink.", ["reason"], registry=r)
        self.tokens_trained = Counter(f"{PREFIX}_tokens_trained", "Tokens that carried a training loss (fresh and replayed).", registry=r)
        self.tokens_replayed = Counter(f"{PREFIX}_tokens_replayed", "Training tokens drawn from the replay buffer.", registry=r)
        self.train_steps = Counter(f"{PREFIX}_train_steps", "Optimizer steps taken by this process.", registry=r)
        self.step = Gauge(f"{PREFIX}_step", "Optimizer steps of the model so far (across restarts).", registry=r)
        self.loss = Gauge(f"{PREFIX}_train_loss", "Training loss of the last step (nats per token).", registry=r)
        self.learning_rate = Gauge(f"{PREFIX}_learning_rate", "Learning rate of the last step.", registry=r)
        self.step_seconds = Histogram(f"{PREFIX}_train_step_seconds", "Wall time of one optimizer step in the learner.", registry=r,
                                      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.buffer_sequences = Gauge(f"{PREFIX}_replay_buffer_sequences", "Sequences held in the replay buffer.", registry=r)
        self.buffer_capacity = Gauge(f"{PREFIX}_replay_buffer_capacity_sequences", "Capacity of the replay buffer.", registry=r)
        self.buffer_domain = Gauge(f"{PREFIX}_replay_buffer_domain_sequences", "Sequences held in the replay buffer, by domain.", ["domain"], registry=r)
        self.buffer_duplicates = Gauge(f"{PREFIX}_replay_buffer_duplicates_suppressed", "Offers the buffer refused as exact duplicates (buffer.dedup).", registry=r)
        self.buffer_tokens = Gauge(f"{PREFIX}_replay_buffer_tokens", "Tokens held in the replay buffer (unpadded).", registry=r)
        self.buffer_capacity_tokens = Gauge(f"{PREFIX}_replay_buffer_capacity_tokens", "Tokens the replay buffer can hold (capacity x train.seq_len).", registry=r)
        self.replay_fraction = Gauge(f"{PREFIX}_replay_fraction", "Share of the last training batch drawn from the replay buffer.", registry=r)
        self.domain_mix_shifts = Counter(f"{PREFIX}_domain_mix_shifts", "Shifts of the fresh stream's domain mix detected (each restarts the replay boost).", registry=r)
        self.buffer_seen = Gauge(f"{PREFIX}_replay_buffer_seen_sequences", "Sequences offered to the replay buffer so far.", registry=r)
        self.pending_tokens = Gauge(f"{PREFIX}_pending_tokens", "Tokens read from the stream and not yet trained on.", registry=r)
        self.checkpoints = Counter(f"{PREFIX}_checkpoints", "Checkpoints committed.", registry=r)
        self.checkpoint_seconds = Histogram(f"{PREFIX}_checkpoint_write_seconds", "Time to write and commit one checkpoint.", registry=r,
                                            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.gate_decisions = Counter(f"{PREFIX}_gate_decisions", "Gate judgements by verdict (promoted, rejected, skipped).", ["verdict"], registry=r)
        self.gate_loss = Gauge(f"{PREFIX}_gate_loss", "Held-out losses at the last judgement (nats per token).", ["model", "window"], registry=r)
        self.promotions = Counter(f"{PREFIX}_promotions", "Versions promoted into serving.", registry=r)
        self.swap_seconds = Histogram(f"{PREFIX}_swap_seconds", "Promotion until serving answered with the new version.", registry=r,
                                      buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.served_version = Gauge(f"{PREFIX}_served_version", "Version the serving deployment holds.", registry=r)
        self.served_step = Gauge(f"{PREFIX}_served_step", "Training step of the served version.", registry=r)
