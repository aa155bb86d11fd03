# radai service image: one image, the command chooses the role (node, worker, dashboard).
#   docker build -t radai:cpu .                                  torch's CPU wheel
#   docker build -t radai:cuda --build-arg TORCH_INDEX=cu128 .   torch's CUDA wheel (GPU worker)
# The OHIF viewer's build is fetched in its own stage (pinned version and sha512, with its MIT
# LICENSE), so the running service downloads nothing.
ARG TORCH_INDEX=cpu

FROM node:20-bookworm-slim AS ohif
RUN apt-get update && apt-get install -y --no-install-recommends openssl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY scripts/fetch_ohif.sh scripts/fetch_ohif.sh
RUN scripts/fetch_ohif.sh /ohif

FROM python:3.11-slim-bookworm
ARG TORCH_INDEX
RUN apt-get update && apt-get install -y --no-install-recommends dcmtk \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
RUN pip install --no-cache-dir torch==2.13.0 --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}"
COPY pyproject.toml README.md LICENSE ./
COPY radai radai
COPY db db
COPY dicom_io dicom_io
COPY dicom_node dicom_node
COPY dicomweb dicomweb
COPY viewer viewer
COPY workers workers
COPY ml ml
COPY dashboard dashboard
COPY data data
RUN pip install --no-cache-dir -e .
COPY --from=ohif /ohif var/ohif
ENV RADAI_HOME=/var/lib/radai
ENTRYPOINT ["radai"]
