"""The public HTTP APIs: Ollama (ollama.py), OpenAI (openai.py), Anthropic (anthropic.py).

Each family module exports `routes(ctx: AppContext) -> list[starlette.routing.BaseRoute]`;
supervisor.app assembles them. A family parses its request into a
completion.CompletionRequest and renders the typed runner stream back;
completion.py acquires the model, runs the runner stream and maps failures.
Handlers raise supervisor.errors.CorralError subclasses, which errors.py
renders in each family's shape. Model management (pull, create) lives in
manage.py; unsupported.py answers the routes those APIs define that corral
does not serve (501). No module here imports supervisor.app.
"""
