"""The one container image every component runs in (``@dsl.component(base_image=PROJECT_IMAGE)``)."""
PROJECT_IMAGE = "ghcr.io/linear-moe/linear-moe:0.1.0"
