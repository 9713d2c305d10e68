"""Chat LLMs: model loading, parameter-efficient methods, training and chat."""
