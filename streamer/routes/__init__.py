"""The network edge: one module per route (source.py /v1/stream, subscribe.py /v1/subscribe,
twilio.py /v1/twilio, http.py for /healthz, /metrics, the dashboard and /v1/sessions), plus auth."""
