"""Scheduling policy and cost: which queued jobs run next, together, and what they cost. No torch."""
