# GPU image: NGC PyTorch (CUDA, cuDNN, NCCL, Transformer Engine, apex) + megatron-core 0.16.1 + megatron-ddk.
#
#   docker build -t megatron-ddk .
#   docker build --build-arg NGC_TAG=25.06 -t megatron-ddk .     # another NGC release (its CUDA needs a matching driver)
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -v /data:/data megatron-ddk \
#       torchrun --nproc-per-node 8 pretrain_ddk.py ...
#
# NGC 25.12: Ubuntu 24.04, Python 3.12, PyTorch 2.10 (NVIDIA build), CUDA 13.1. megatron-core 0.16.1
# publishes wheels for CPython 3.10-3.12, so the pin below installs as is. Torch, Transformer Engine
# and apex come from the base image and are never reinstalled: the `cpu` extra (CPU torch) is not used.
ARG NGC_TAG=25.12
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}-py3

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1
WORKDIR /workspace/megatron-ddk

# megatron-core, exactly the version megatron_ddk pins (megatron_ddk/__init__.py refuses any other).
# --no-deps: it declares only torch, numpy and packaging, which the base has; a resolver run could
# replace the NVIDIA torch build. The base's pip constraint file must not hold it to another version.
RUN sed -i '/^megatron[-_.]core[ =<>!~]/Id' /etc/pip/constraint.txt 2>/dev/null || true; \
    pip install --no-deps "megatron-core==0.16.1"

# The rest of pyproject's runtime dependencies and the `hf` extra (converters), minus torch and
# megatron-core; packages the base already has keep its versions (the constraint file holds them).
COPY pyproject.toml ./
RUN python -c "import re, tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
reqs = p['dependencies'] + p['optional-dependencies']['hf']; \
print('\n'.join(r for r in reqs if re.split(r'[<>=!~\[; ]', r)[0] not in ('torch', 'megatron-core')))" \
    > /tmp/requirements.txt \
 && cat /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# The project itself, editable so a mounted checkout or a patch takes effect without a rebuild.
COPY . .
RUN pip install --no-deps --no-build-isolation -e . \
 && python -c "import megatron_ddk, megatron.core; print('megatron-ddk', megatron_ddk.__version__, \
'on megatron-core', megatron.core.__version__)"
