"""Workers: claim jobs from the store, run them on the engine, write images and events."""
