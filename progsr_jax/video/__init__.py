"""Video (placeholder)."""
