# The xares encoder base image for machines that can pull from a registry.
#
#   docker build -f docker/encoder-base.Dockerfile -t xares/encoder-base:latest docker/
#
# Offline (no registry), `make base-image` builds an equivalent image from Debian packages instead
# (docker/build-base-image.sh). Both give python3 (3.11) with numpy, onnxruntime and soundfile at the
# versions the evaluator uses, and nothing else; the submission template builds FROM either.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

RUN pip install --no-cache-dir --disable-pip-version-check \
        numpy==2.4.6 onnxruntime==1.31.1 soundfile==0.14.0 \
    && mkdir -p /input /output

# Informational only: the evaluator ignores the image's ENV, ENTRYPOINT and CMD and runs the
# manifest's entrypoint as user 65534 with its own environment.
ENV LANG=C.UTF-8
CMD ["python3"]
