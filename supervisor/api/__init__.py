"""The public HTTP APIs: Ollama (ollama.py), OpenAI (openai.py), Anthropic (anthropic.py).

Each module exports `routes(ctx: AppContext) -> list[starlette.routing.BaseRoute]`;
supervisor.app assembles them. Handlers call ctx.scheduler.acquire() and never
start runners; they raise supervisor.errors.CorralError subclasses, which each
family turns into its own error shape.
"""
