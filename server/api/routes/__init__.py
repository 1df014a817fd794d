"""The routes, one module per resource. Each handler takes what it uses (the catalog, the prompts, the bridge)
before the request; `LoraswapSpec` binds them and registers the routes."""
