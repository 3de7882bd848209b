# One image for every role of meshctl in a cluster:
#   controller  the selection controller (`meshctl run`)
#   server      the FL server (`meshctl server`)
#   client      one FL client service (`python -m meshctl.flower.clientservice`)
# The first argument names the role; the rest goes to that role's command.
#
#   docker build -t meshctl:dev .
#
# torch is large: point PIP_EXTRA_INDEX_URL at a CPU-only wheel index to keep
# CUDA libraries out of the image.
FROM python:3.11-slim

ARG PIP_EXTRA_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    HOME=/tmp

WORKDIR /app
COPY pyproject.toml README.md ./
COPY meshctl ./meshctl
COPY fl_app ./fl_app
RUN pip install --no-cache-dir .
COPY --chmod=0755 deploy/entrypoint.sh /usr/local/bin/meshctl-role

# The manifests run it read-only, as this user, with /tmp on an emptyDir.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/meshctl-role"]
CMD ["controller"]
