"""Prometheus metrics of a run, on a registry passed in (tests pass their own).

Every label takes values from a bounded set: domains are capped at 1024 names
(later ones count under ``(other)``, as the replay buffer does), the rest are
fixed vocabularies (stage, reason, verdict, component, event). The ``_created``
series are not exported: they double the series count and nothing reads them.
"""

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from everlearn.buffers.storage import MAX_DOMAINS, OTHER_DOMAIN

PREFIX = "everlearn"

disable_created_metrics()


class BoundedLabels:
    """The first ``limit - 1`` distinct values pass through; every later one becomes ``(other)``."""

    def __init__(self, limit: int = MAX_DOMAINS, other: str = OTHER_DOMAIN):
        self.limit, self.other = limit, other
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self.limit - 1:
                self._seen.add(value)
                return value
        return self.other


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.domain_label = BoundedLabels()
        # ingest
        self.documents_ingested = Counter(f"{PREFIX}_documents_ingested", "Documents decoded from the stream (trained and held out), by domain (at most 1024 names, then (other)).", ["domain"], registry=r)
        self.documents_held_out = Counter(f"{PREFIX}_documents_held_out", "Documents held out of training for the gates.", registry=r)
        self.documents_dead_lettered = Counter(f"{PREFIX}_documents_dead_lettered", "Records sent to the dead-letter sink, by reason.", ["reason"], registry=r)
        self.source_errors = Counter(f"{PREFIX}_source_errors", "Polls of the source that failed (retried with backoff).", registry=r)
        self.source_events = Counter(f"{PREFIX}_source_events", "Files the source saw deleted, truncated, renamed, replaced, corrupt (compressed) or arrive late.", ["event"], registry=r)
        self.ingest_queue_windows = Gauge(f"{PREFIX}_ingest_queue_windows", "Packed windows ready for training (the bounded queue between ingest and train).", registry=r)
        self.pending_tokens = Gauge(f"{PREFIX}_pending_tokens", "Tokens read from the stream and not yet trained on.", registry=r)
        # kafka (topics come from source.url, partitions from the topics: bounded)
        self.kafka_records = Counter(f"{PREFIX}_kafka_records", "Kafka records read, by topic.", ["topic"], registry=r)
        self.kafka_bytes = Counter(f"{PREFIX}_kafka_bytes", "Bytes of Kafka record values read, by topic.", ["topic"], registry=r)
        self.kafka_lag = Gauge(f"{PREFIX}_kafka_lag", "Records in a partition not yet read by this run (high watermark - position).", ["topic", "partition"], registry=r)
        self.kafka_rebalances = Counter(f"{PREFIX}_kafka_rebalances", "Partition assignments received from the consumer group.", registry=r)
        self.kafka_skipped = Counter(f"{PREFIX}_kafka_offsets_skipped", "Offsets deleted by retention before this run read them, by topic.", ["topic"], registry=r)
        self.kafka_dead_letters = Counter(f"{PREFIX}_kafka_dead_letters", "Dead-lettered records produced to source.kafka.dlq_topic.", registry=r)
        self.kafka_commits = Counter(f"{PREFIX}_kafka_offset_commits", "Offset commits to the broker after a durable checkpoint.", registry=r)
        # train
        self.tokens_trained = Counter(f"{PREFIX}_tokens_trained", "Tokens that carried a training loss (fresh and replayed).", registry=r)
        self.tokens_replayed = Counter(f"{PREFIX}_tokens_replayed", "Training tokens drawn from the replay buffer.", registry=r)
        self.train_steps = Counter(f"{PREFIX}_train_steps", "Optimizer steps taken by this process.", registry=r)
        self.train_wait_seconds = Counter(f"{PREFIX}_train_wait_seconds", "Time the trainer waited for packed windows from ingest.", registry=r)
        self.nonfinite_steps = Counter(f"{PREFIX}_nonfinite_steps", "Steps skipped because the loss or gradient was NaN or infinite (batch quarantined).", registry=r)
        self.documents_quarantined = Counter(f"{PREFIX}_documents_quarantined", "Documents recorded in quarantine.jsonl from skipped non-finite steps.", registry=r)
        self.rollbacks = Counter(f"{PREFIX}_rollbacks", "Restores of the whole run from its newest verified checkpoint, by the stage that failed.", ["stage"], registry=r)
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
        # checkpoints
        self.checkpoints = Counter(f"{PREFIX}_checkpoints", "Checkpoints committed.", registry=r)
        self.checkpoint_failures = Counter(f"{PREFIX}_checkpoint_failures", "Checkpoint writes that failed (storage unreachable, non-finite weights); the run goes on.", registry=r)
        self.checkpoints_set_aside = Counter(f"{PREFIX}_checkpoints_set_aside", "Damaged or never-committed checkpoint directories moved aside (never loaded).", registry=r)
        self.checkpoint_seconds = Histogram(f"{PREFIX}_checkpoint_write_seconds", "Time to write and commit one checkpoint.", registry=r,
                                            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        # supervision
        self.stage_restarts = Counter(f"{PREFIX}_stage_restarts", "Restarts of a stage's actor or thread (ingest, train, judge, promote).", ["stage"], registry=r)
        self.degraded = Gauge(f"{PREFIX}_degraded", "1 while a component has been failing for longer than supervision.degraded_after_s.", ["component"], registry=r)
        # judge and promote
        self.gate_decisions = Counter(f"{PREFIX}_gate_decisions", "Gate judgements by verdict (promoted, rejected, skipped, failed).", ["verdict"], registry=r)
        self.gate_loss = Gauge(f"{PREFIX}_gate_loss", "Held-out losses at the last judgement (nats per token).", ["model", "window"], registry=r)
        self.gate_improvement_lower = Gauge(f"{PREFIX}_gate_improvement_lower_bound", "Lower confidence bound of the last judged candidate's improvement on the fresh window (1 - candidate / serving loss).", registry=r)
        self.gate_forgetting_upper = Gauge(f"{PREFIX}_gate_forgetting_upper_bound", "Upper confidence bound of the last judged candidate's forgetting on all old windows (candidate / reference loss - 1), by reference (serving, anchor).", ["reference"], registry=r)
        self.gate_kl = Gauge(f"{PREFIX}_gate_kl", "Mean per-token KL(serving || candidate) of next-token distributions on the probe sequences at the last judgement (nats).", registry=r)
        self.gate_failures = Counter(f"{PREFIX}_gate_failures", "Candidates refused or skipped, by the first gate that failed (evidence, sanity, improvement, forgetting, anchor, behaviour, generation).", ["gate"], registry=r)
        self.judge_seconds = Histogram(f"{PREFIX}_judge_seconds", "Time from submitting a candidate to the evaluator to its verdict.", registry=r,
                                       buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.branch_steps = Counter(f"{PREFIX}_branch_steps", "Optimizer steps taken by anneal branches (gate.candidate: anneal_branch), beside the trunk's.", registry=r)
        self.branch_seconds = Histogram(f"{PREFIX}_branch_seconds", "Wall time of one anneal branch, from its start to its committed candidate.", registry=r,
                                        buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600))
        self.branches = Counter(f"{PREFIX}_branches", "Anneal branches by outcome: done, reused (committed before a restart), failed, skipped (the trunk was judged).", ["outcome"], registry=r)
        self.promotions = Counter(f"{PREFIX}_promotions", "Versions promoted into serving.", registry=r)
        self.promotions_reverted = Counter(f"{PREFIX}_promotions_reverted", "Promotions undone because serving could not load the version.", registry=r)
        self.serving_rollbacks = Counter(f"{PREFIX}_serving_rollbacks", "Rollbacks of serving to an earlier promoted version, by trigger (manual: the admin API; auto: post-swap monitoring).", ["trigger"], registry=r)
        self.admin_calls = Counter(f"{PREFIX}_admin_calls", "Admin API calls, by action and HTTP status (401/403: refused credentials).", ["action", "code"], registry=r)
        self.drift_events = Counter(f"{PREFIX}_drift_events", "Drift detected: data (the stream's byte distribution vs the reference) or loss (Page-Hinkley on serving's held-out loss).", ["kind"], registry=r)
        self.drift_psi = Gauge(f"{PREFIX}_drift_psi", "Population stability index of the stream's newest window vs the reference (NaN until comparable).", registry=r)
        self.drift_js = Gauge(f"{PREFIX}_drift_js_divergence", "Jensen-Shannon divergence (in bits, 0 to 1) of the stream's newest window vs the reference.", registry=r)
        self.drift_page_hinkley = Gauge(f"{PREFIX}_drift_page_hinkley", "Page-Hinkley statistic on serving's per-document held-out loss.", registry=r)
        self.drift_active = Gauge(f"{PREFIX}_drift_active", "1 while a data-drift episode is open.", registry=r)
        self.watch_version = Gauge(f"{PREFIX}_watch_version", "Version under post-swap watch (0: none).", registry=r)
        self.paused = Gauge(f"{PREFIX}_training_paused", "1 while training is paused by an operator (everlearn pause).", registry=r)
        self.swap_seconds = Histogram(f"{PREFIX}_swap_seconds", "Promotion until every serving replica reported the new manifest sha256.", registry=r,
                                      buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.served_version = Gauge(f"{PREFIX}_served_version", "Version the serving deployment holds.", registry=r)
        self.served_step = Gauge(f"{PREFIX}_served_step", "Training step of the served version.", registry=r)
        self.served_promoted = Gauge(f"{PREFIX}_served_promoted_timestamp_seconds", "Unix time the served version was promoted (version 0: when the run started).", registry=r)
        self.gate_rejections_in_a_row = Gauge(f"{PREFIX}_gate_consecutive_rejections", "Candidates refused by the gates since the last one that passed.", registry=r)
