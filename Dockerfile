# One image for every role: api, dicom (listener + assembler), worker, migrate.
# Build:  docker build -t cttriage .            (torch from PyPI: the CUDA build, for GPU workers)
#         docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t cttriage:cpu .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    CTTRIAGE_DATA_DIR=/var/lib/cttriage CTTRIAGE_STORAGE_DIR=/var/lib/cttriage/storage

RUN apt-get update && apt-get install -y --no-install-recommends dcmtk curl && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/cttriage cttriage \
    && mkdir -p /var/lib/cttriage/storage && chown -R cttriage /var/lib/cttriage

WORKDIR /opt/cttriage
RUN pip install --no-cache-dir torch==${TORCH_VERSION} ${TORCH_INDEX:+--index-url ${TORCH_INDEX}}
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY models ./models
COPY migrations ./migrations
RUN pip install --no-cache-dir .

USER cttriage
VOLUME ["/var/lib/cttriage"]
EXPOSE 8000 11112
ENTRYPOINT ["cttriage"]
CMD ["serve"]
