# The image every node of a Ray cluster runs, head and GPU workers alike: Ray 2.60 with CUDA on
# Python 3.11, and this project with the dependencies pinned in pyproject.toml.
#   docker build -t semckd-ray:0.1.0 --build-arg GIT_COMMIT=$(git rev-parse HEAD) .
FROM rayproject/ray:2.60.0-py311-gpu

# The Ray image's own non-root user (uid 1000, group users); its Python is on PATH.
USER ray
WORKDIR /home/ray/semckd-ray

# Dependencies first, read from pyproject.toml alone, so that a code change does not reinstall torch.
COPY --chown=1000:100 pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY --chown=1000:100 . ./
# Editable, so that tune_configs/ (the default sweep, the teacher files) stays next to the package.
RUN pip install --no-cache-dir --no-deps -e .

# .git stays out of the image; runs record this commit as their git_commit tag instead.
ARG GIT_COMMIT=unknown
ENV SEMCKD_GIT_COMMIT=${GIT_COMMIT}

CMD ["python", "-m", "semckd_ray.tune", "--config", "tune_configs/default.yaml"]
