"""The inspection service (main_serve.py): model files behind an HTTP API and a browser page.

scoring.py is the one method-specific seam (load a model; score a batch of decoded images), uploads.py
reads and checks what clients send, batching.py gathers concurrent requests into one scoring call, and
app.py is the FastAPI application.
"""
