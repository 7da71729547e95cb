# The posetune cluster image: every node of cluster/gcp.yaml and cluster/kuberay.yaml runs it.
#
#   docker build -t YOUR_REGION-docker.pkg.dev/YOUR_PROJECT_ID/posetune/posetune:0.1.0-ray2.60.0 .
#   docker push    YOUR_REGION-docker.pkg.dev/YOUR_PROJECT_ID/posetune/posetune:0.1.0-ray2.60.0
#
# The base is Ray's own GPU image (CUDA, Python 3.11) at exactly the Ray version this checkout
# resolves (tests/test_cluster_files.py checks both), because a Ray client and cluster must run
# the same Ray and Python versions. It has no torch: the CUDA build comes from the registry in
# its own layer, so a posetune change rebuilds only the small layers above it. No credentials
# are baked in: nodes use their service account (GCP) or Workload Identity (GKE).
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/posetune

# torch and torchvision (about 3 GB): their own layer, reused across posetune versions.
RUN pip install --no-cache-dir "torch>=2.4" "torchvision>=0.29"

# posetune's other dependencies, then posetune itself.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users posetune ./posetune
RUN pip install --no-cache-dir . \
    && python -c "import posetune, ray, torch; print('posetune', posetune.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"

# The search spaces and configs, so that `posetune search search_spaces/default.yaml` works
# from the working directory on the head.
COPY --chown=ray:users configs ./configs
COPY --chown=ray:users search_spaces ./search_spaces
