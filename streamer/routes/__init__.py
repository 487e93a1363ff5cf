"""The network edge: one module per route (source.py /v1/stream, subscribe.py /v1/subscribe,
twilio.py /v1/twilio, listen.py /v1/listen, mapped for websockets' router in websocket.py; http.py
for /healthz, /metrics, the dashboard and /v1/sessions on a werkzeug map), plus auth."""
