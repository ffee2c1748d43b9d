# syntax=docker/dockerfile:1
# The ctrserve scoring gateway (`ctrserve serve`). docs/deploy.md explains every setting.
#
#   docker build -t ctrserve-gateway:0.1.0 .                      # the gateway (default target)
#   docker build -t ctrserve-loadtest:0.1.0 --target loadtest .   # gateway package + Locust
#   docker build -t ctrserve-gateway-gpu:0.1.0 --target gateway-gpu .  # embedded ONNX Runtime on CUDA
#
# The gateway image installs only the project's base `dependencies` (pyproject.toml): FastAPI,
# Redis, ONNX Runtime, the Triton client. No torch: training and export run elsewhere and hand
# over a model repository (`ctrserve export`). Configuration: CTRSERVE_* environment variables.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a virtualenv with ctrserve and its runtime dependencies -------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# every package folder of [tool.setuptools] package-dir, plus the metadata pip needs
COPY pyproject.toml README.md ./
COPY ctrserve ctrserve
COPY models models
COPY service service
COPY export export
COPY feature_store feature_store
COPY loadtests loadtests
# `pip install .` without extras = the serving set; fail the build if torch sneaks in
RUN pip install . \
 && python -c "import importlib.util as u, sys; sys.exit('torch must not be in the gateway image' if u.find_spec('torch') else 0)"

# ---- build-load: the same plus Locust (the `load` extra, pinned in pyproject.toml) ----------
FROM build AS build-load
RUN pip install ".[load]"

# ---- build-gpu: the serving set with onnxruntime-gpu (the `gpu` extra) in place of onnxruntime -----
# Both wheels install the Python package `onnxruntime`: with both present, removing either breaks the
# other. So: install the extra (pulls the CUDA/cuDNN wheels), remove both, put the GPU wheel back alone.
# The pin below must equal the `gpu` extra's (tests/deploy/test_dockerfile.py checks).
FROM build AS build-gpu
RUN pip install ".[gpu]" \
 && pip uninstall -y onnxruntime onnxruntime-gpu \
 && pip install --no-deps "onnxruntime-gpu==1.31.1" \
 && python -c "import importlib.metadata as m, sys; m.distribution('onnxruntime-gpu'); sys.exit('the CPU onnxruntime wheel is still installed' if any(d.metadata['Name'] == 'onnxruntime' for d in m.distributions()) else 0)" \
 && python -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 'onnxruntime has no CUDA provider')"

# ---- runtime base: non-root user, no build tools ---------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 ctrserve \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/ctrserve --create-home --shell /usr/sbin/nologin ctrserve
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=1
WORKDIR /home/ctrserve

# ---- loadtest: `docker build --target loadtest` (deploy/compose.yaml, profile `load`) --------
FROM runtime AS loadtest
COPY --from=build-load /opt/venv /opt/venv
USER 10001:10001
ENTRYPOINT ["locust"]

# ---- gateway-gpu: the gateway with embedded ONNX Runtime on CUDA (`docker run --gpus 1`) ---------------
# The NVIDIA Container Toolkit mounts the host's driver (CUDA 13 needs driver >= 580); CUDA and cuDNN
# come from the nvidia-* wheels in the virtualenv. Same settings as `gateway` plus the provider.
FROM runtime AS gateway-gpu
COPY --from=build-gpu /opt/venv /opt/venv
ENV CTRSERVE_SERVER_HOST=0.0.0.0 \
    CTRSERVE_SERVER_PORT=8000 \
    CTRSERVE_BACKEND_MODEL_REPOSITORY=/models \
    CTRSERVE_WORK_DIR=/home/ctrserve/work \
    CTRSERVE_BACKEND_PROVIDER=cuda \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CTRSERVE_SERVER_PORT', '8000') + '/healthz', timeout=2)"]
ENTRYPOINT ["ctrserve", "serve"]

# ---- gateway: the default (last) target -------------------------------------------------------
FROM runtime AS gateway
COPY --from=build /opt/venv /opt/venv
# container defaults; every CTRSERVE_* variable can be overridden at `docker run -e` / in the manifests
ENV CTRSERVE_SERVER_HOST=0.0.0.0 \
    CTRSERVE_SERVER_PORT=8000 \
    CTRSERVE_BACKEND_MODEL_REPOSITORY=/models \
    CTRSERVE_WORK_DIR=/home/ctrserve/work
USER 10001:10001
EXPOSE 8000
# liveness only (/healthz answers as soon as the process serves); readiness is /readyz
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CTRSERVE_SERVER_PORT', '8000') + '/healthz', timeout=2)"]
ENTRYPOINT ["ctrserve", "serve"]
