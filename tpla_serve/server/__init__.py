"""HTTP servers (SGLang native + OpenAI APIs) and the scheduler process behind them."""
