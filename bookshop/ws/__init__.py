"""The gateway's live hub: channels, subscriptions, bounded per-client queues, resume from ``seq``."""
