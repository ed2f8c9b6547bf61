# The Bookshop image: one service per container (python run.py --service NAME --port N), or with no
# arguments the whole shop with its embedded database (data in /data). See deploy/README.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BOOKSHOP_HOST=0.0.0.0 \
    BOOKSHOP_DATA_DIR=/data

# a user of its own: the services need to write nothing but /data (all-in-one mode only)
RUN groupadd --system --gid 10001 bookshop \
    && useradd --system --uid 10001 --gid bookshop --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin bookshop \
    && mkdir /data \
    && chown bookshop:bookshop /data

WORKDIR /app
COPY setup.py run.py ./
COPY bookshop ./bookshop
# bookshop/openapi.yaml links to it
COPY docs/openapi.yaml ./docs/
RUN pip install --no-cache-dir .

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000

# 8000 is the gateway's port (and the all-in-one mode's); compose.yaml and the Kubernetes manifests probe
# each other service on its own port
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

ENTRYPOINT ["python", "run.py"]
