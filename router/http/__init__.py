"""OpenAI-compatible HTTP gateway of the router (shaped as vLLM's API server).

It runs inside the router process, on the router's event loop, and submits requests to the
``RequestScheduler`` directly as an in-process client (``gateway.LocalClients``): no extra
hop, no extra socket. Imported only when HTTP is on (Starlette and uvicorn load lazily).

    config.py         HttpConfig: bind address, API key, body limit, model name, chat template
    gateway.py        HttpGateway: the uvicorn server on the router's loop; in-process clients
    app.py            the routes
    openai_schema.py  request bodies -> validated CompletionRequest records
    responses.py      CompletionRequest + outputs -> OpenAI response and chunk JSON
    sse.py            server-sent-event framing
    errors.py         APIError and vLLM's error shape
    auth.py           the Bearer API-key check
"""
