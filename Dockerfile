FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY config config
COPY worker worker
COPY tasks tasks
RUN pip install --no-cache-dir . && mkdir -p var
ENV PYTHONUNBUFFERED=1
