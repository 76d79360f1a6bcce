"""How a message reads as text: its parts as text, token counts, summaries, entities,
full-text queries, and the pluggable components behind them."""
