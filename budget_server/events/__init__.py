"""Budget events: what happened to a budget, fanned out to watchers, streams and webhooks."""
