"""The API process (uvicorn): every HTTP route, the checks a request passes before it is queued, the bridge to
the workers, and the mapping of every error to an HTTP status."""
