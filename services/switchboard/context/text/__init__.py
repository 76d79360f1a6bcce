"""How a message reads as text: token counts (of its parts as ``shared/parttext.py``
writes them), summaries, entities, full-text queries, and the pluggable components
behind them."""
