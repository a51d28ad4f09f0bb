# everlearn's image: the daemon, the learners, the evaluator and serving all run it
# (the Helm chart uses it for the Ray head, its workers and the daemon's container).
#
#   docker build -t everlearn:0.1.0-cpu .
#   docker build --build-arg VARIANT=cuda -t everlearn:0.1.0-cuda .
#
# VARIANT picks torch's build: cpu, or cuda (CUDA 12.8 wheels carry the CUDA libraries
# themselves; the node's NVIDIA driver is all a GPU pod needs). Everything else is
# installed at the versions in constraints.txt, the ones the test suite runs.

ARG PYTHON_VERSION=3.11
ARG VARIANT=cpu

# --- build: a virtual environment in /opt/everlearn -------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/everlearn && /opt/everlearn/bin/pip install "pip>=25"
# torch first, from its own index: the resolver never picks a build of its own choosing
RUN case "${VARIANT}" in \
      cpu) index=https://download.pytorch.org/whl/cpu ;; \
      cuda) index=https://download.pytorch.org/whl/cu128 ;; \
      *) echo "VARIANT must be cpu or cuda, not ${VARIANT}" >&2; exit 1 ;; \
    esac \
 && /opt/everlearn/bin/pip install --index-url "${index}" "torch==${TORCH_VERSION}"
COPY constraints.txt pyproject.toml README.md LICENSE ./
COPY everlearn ./everlearn
COPY daemon ./daemon
COPY buffers ./buffers
COPY learners ./learners
COPY deploy ./deploy
# constraints.txt pins the CPU torch of the test machine: leave torch as installed above
RUN grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
 && /opt/everlearn/bin/pip install -c /tmp/constraints.txt . \
 && /opt/everlearn/bin/everlearn --help > /dev/null

# --- runtime: no compilers, no pip cache, a non-root user ------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="everlearn" \
      org.opencontainers.image.description="Streaming continual-learning daemon on Ray" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.everlearn.variant="${VARIANT}"
# wget: KubeRay's default probes of Ray containers call it
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget=1.21.* \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 everlearn \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /bin/bash everlearn
COPY --from=build /opt/everlearn /opt/everlearn
COPY --from=build /src/LICENSE /usr/share/doc/everlearn/
ENV PATH=/opt/everlearn/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /tmp
USER 1000:1000
EXPOSE 8000 9400
ENTRYPOINT ["everlearn"]
CMD ["run"]
