"""Weight layers usable in place of ``nn.Linear`` (structured-sparse projections)."""
