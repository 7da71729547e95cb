# The posetune cluster image: every node of cluster/gcp.yaml and cluster/kuberay.yaml runs it.
#
#   docker build -t YOUR_REGION-docker.pkg.dev/YOUR_PROJECT_ID/posetune/posetune:0.1.0-ray2.60.0 .
#   docker push    YOUR_REGION-docker.pkg.dev/YOUR_PROJECT_ID/posetune/posetune:0.1.0-ray2.60.0
#
# Reproducible: the base is Ray's own GPU image at an exact tag, exactly the Ray and Python
# versions this checkout resolves (tests/test_cluster_files.py checks both; a Ray client and
# cluster must run the same Ray and Python). To freeze it further, pin its digest:
# `docker buildx imagetools inspect rayproject/ray:2.60.0-py311-gpu` prints it; write
# FROM rayproject/ray:2.60.0-py311-gpu@sha256:<digest>. torch and torchvision are exact, and every
# other dependency comes from cluster/constraints.txt, the tested environment's versions.
#
# The driver pairing: torch 2.14.1 from PyPI is built for CUDA 13.0, which needs an NVIDIA driver
# R580 or newer. cluster/gcp.yaml's node image (common-cu129-ubuntu-2204-nvidia-580-*) has R580;
# GKE: create the L4 node pool with --accelerator ...,gpu-driver-version=latest (R580 or newer).
# The build fails if the CUDA build is not the one that pairing expects.
# No credentials are baked in: nodes use their service account (GCP) or Workload Identity (GKE).
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/posetune

# torch and torchvision (about 3 GB): their own layer, reused across posetune versions.
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 \
    && python -c "import torch, torchvision; assert torch.version.cuda == '13.0', f'torch {torch.__version__} is built for CUDA {torch.version.cuda}, not 13.0: the node image driver (R580) pairing in cluster/gcp.yaml no longer holds'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'torchvision', torchvision.__version__)"

# posetune's other dependencies at the tested versions, then posetune itself.
COPY --chown=ray:users cluster/constraints.txt ./cluster/constraints.txt
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users posetune ./posetune
RUN pip install --no-cache-dir -c cluster/constraints.txt . \
    && python -c "import posetune, ray, torch; print('posetune', posetune.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"

# The search spaces and configs, so that `posetune search search_spaces/default.yaml` works
# from the working directory on the head.
COPY --chown=ray:users configs ./configs
COPY --chown=ray:users search_spaces ./search_spaces
