"""Live call monitoring: telephony.py (Twilio messages, mu-law), alerts.py (rules), summary.py
(the call summary), webhook.py (POSTs that never block)."""
