"""``source.kafka``: how a ``kafka://`` source reads its topics, and the client settings it passes to kafka-python.

Secrets never sit in the configuration: a password is read, when the client is
built, from the environment variable or the file the configuration names, so
``validate --show``, logs, metrics and /status only ever show those names.
"""

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from everlearn.errors import ConfigError

SCHEME = "kafka://"
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")  # Kafka's own rule for topic names
_HOST = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")
_ID_FROM = re.compile(r"^(field|key|offset|header:.+)$")
_DOMAIN_FROM = re.compile(r"^(field|key|topic|header:.+)$")


def is_kafka(url: str) -> bool:
    return url.startswith(SCHEME)


def parse_url(url: str) -> tuple[list[str], list[str]]:
    """``kafka://HOST:PORT[,HOST:PORT...]/TOPIC[,TOPIC...]`` -> (bootstrap servers, topics)."""
    example = "e.g. kafka://broker-1:9092,broker-2:9092/news,papers"
    rest = url[len(SCHEME):] if is_kafka(url) else None
    if rest is None or "/" not in rest:
        raise ValueError(f"{url!r} is not a Kafka URL: expected kafka://HOST:PORT[,HOST:PORT...]/TOPIC[,TOPIC...] ({example})")
    hosts_part, topics_part = rest.split("/", 1)
    hosts = [h for h in hosts_part.split(",") if h]
    topics = [t for t in topics_part.split(",") if t]
    bad_hosts = [h for h in hosts if not _HOST.match(h)]
    if not hosts or bad_hosts:
        raise ValueError(f"{url!r}: brokers must be HOST:PORT, comma-separated; got {bad_hosts or 'none'} ({example})")
    bad_topics = [t for t in topics if not _TOPIC.match(t)]
    if not topics or bad_topics:
        raise ValueError(f"{url!r}: topics are 1-249 of [A-Za-z0-9._-], comma-separated; got {bad_topics or 'none'} ({example})")
    return hosts, topics


def _secret(env_name: str | None, file: str | None, what: str) -> str | None:
    """A secret from the environment variable or the file named; None when neither is set."""
    if env_name:
        value = os.environ.get(env_name)
        if value is None:
            raise ConfigError(f"{what}: the environment variable {env_name} (named by the config) is not set; "
                              "set it, or name another one")
        return value
    if file:
        try:
            return Path(file).read_text().rstrip("\n")
        except OSError as e:
            raise ConfigError(f"{what}: cannot read the file {file} named by the config ({e.strerror})") from e
    return None


class KafkaConfig(BaseModel):
    """Options of a `kafka://` source (source.url)."""

    model_config = ConfigDict(extra="forbid")

    group_id: str = Field("everlearn", min_length=1, description="Consumer group: the broker assigns the topics' partitions among its members. Offsets are always taken from the run checkpoint, never from the group.")
    client_id: str = Field("everlearn", min_length=1, description="Client id the broker sees in its logs and quotas.")
    start: Literal["earliest", "latest"] = Field("earliest", description="Where to begin a partition the run has never read: its first retained record, or only records produced from now on.")
    value_format: Literal["json", "text"] = Field("json", description="json: each message is a JSON object like a .jsonl line ({\"text\", \"id\"?, \"domain\"?}); text: the message is the document's text.")
    id_from: str = Field("field", description="Where a document's id comes from: field (the record's \"id\", else topic:partition:offset), key (the message key), header:NAME, or offset (always topic:partition:offset). A message without the key or header falls back to field.")
    domain_from: str = Field("field", description="Where a document's domain comes from: field (the record's \"domain\", else the topic name), key, header:NAME, or topic.")
    dlq_topic: str | None = Field(None, description="Topic that receives every dead-lettered record (as well as the dead-letter file), with headers original_topic, original_partition, original_offset, reason, detail. Empty: the file only.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field("PLAINTEXT", description="How to talk to the brokers.")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(None, description="SASL mechanism with SASL_PLAINTEXT / SASL_SSL.")
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password_env: str | None = Field(None, description="Name of the environment variable that holds the SASL password (the password itself is never in the config).")
    sasl_password_file: str | None = Field(None, description="File that holds the SASL password (e.g. a mounted Kubernetes secret).")
    ssl_cafile: str | None = Field(None, description="CA certificate file that signs the brokers' certificates.")
    ssl_certfile: str | None = Field(None, description="Client certificate file (mutual TLS).")
    ssl_keyfile: str | None = Field(None, description="Client private key file (mutual TLS).")
    ssl_key_password_env: str | None = Field(None, description="Environment variable holding the client key's password, if it has one.")
    ssl_key_password_file: str | None = Field(None, description="File holding the client key's password, if it has one.")
    session_timeout_ms: int = Field(10_000, ge=1000, description="A consumer silent this long leaves the group; a rejoin takes about half of it.")  # the group coordinator's minimum is 6 s on Apache Kafka
    heartbeat_interval_ms: int = Field(2_000, ge=100, description="Heartbeats to the group coordinator.")
    request_timeout_ms: int = Field(15_000, ge=1000, description="A broker request unanswered this long fails (and is retried with backoff); a paused broker shows as degraded after supervision.degraded_after_s.")
    probe_after_s: float = Field(5.0, gt=0, description="When polls keep returning nothing for this long, the brokers are asked for metadata: an unreachable cluster then counts as a source error instead of an empty stream.")

    @field_validator("id_from")
    @classmethod
    def _id_from(cls, v: str) -> str:
        if not _ID_FROM.match(v):
            raise ValueError(f"{v!r}: use field, key, offset or header:NAME")
        return v

    @field_validator("domain_from")
    @classmethod
    def _domain_from(cls, v: str) -> str:
        if not _DOMAIN_FROM.match(v):
            raise ValueError(f"{v!r}: use field, key, topic or header:NAME")
        return v

    def client_kwargs(self, servers: list[str]) -> dict[str, Any]:
        """kafka-python settings common to the consumer and the dead-letter producer, secrets resolved now."""
        kw: dict[str, Any] = {"bootstrap_servers": servers, "client_id": self.client_id,
                              "security_protocol": self.security_protocol, "request_timeout_ms": self.request_timeout_ms}
        if self.security_protocol.startswith("SASL"):
            password = _secret(self.sasl_password_env, self.sasl_password_file, "source.kafka SASL password")
            if not (self.sasl_mechanism and self.sasl_username and password is not None):
                raise ConfigError(f"source.kafka.security_protocol={self.security_protocol} needs sasl_mechanism, sasl_username "
                                  "and sasl_password_env or sasl_password_file")
            kw.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username, sasl_plain_password=password)
        if self.security_protocol.endswith("SSL"):
            kw.update(ssl_check_hostname=True, ssl_cafile=self.ssl_cafile, ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile,
                      ssl_password=_secret(self.ssl_key_password_env, self.ssl_key_password_file, "source.kafka SSL key password"))
        return kw
