# Analytics ingestion service: WSGI app served by waitress on port 8000.
FROM python:3.11-slim-bookworm

# Logs straight to stdout (no buffering); no .pyc files in a read-only app dir.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so code changes don't invalidate this layer.
# psycopg2-binary ships its own libpq: no compiler or apt packages needed.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

# Unprivileged user. The code stays root-owned (read-only to the service), but
# the user owns /app itself so `pytest` can write its .pytest_cache there.
RUN groupadd --system --gid 10001 app \
    && useradd --system --no-create-home --uid 10001 --gid app app \
    && chown app:app /app

# The tests ship in the image so that
# `docker compose run --rm analytics-backend pytest` works.
COPY analytics.py schema.sql test_analytics.py test_browser.py pytest.ini ./

# Numeric, so runtimes can verify it is not root (runAsNonRoot).
USER 10001:10001
EXPOSE 8000

# slim has no curl: probe with the stdlib. urlopen raises (exit 1) on a
# refused connection, a timeout or a non-2xx answer such as /health's 503.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]

# Exec form: python is PID 1 and receives SIGTERM from `docker stop` directly.
CMD ["python", "analytics.py"]
