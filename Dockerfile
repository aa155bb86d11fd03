# radai service image: one image, the command chooses the role (node, worker, dashboard).
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends dcmtk \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY radai radai
COPY db db
COPY dicom_io dicom_io
COPY dicom_node dicom_node
COPY dicomweb dicomweb
COPY workers workers
COPY ml ml
COPY dashboard dashboard
COPY data data
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir -e .
ENV RADAI_HOME=/var/lib/radai
VOLUME /var/lib/radai
ENTRYPOINT ["radai"]
