"""A/B prompt experiments: variants × seeds rendered as batch items, measured, tested and reported."""
