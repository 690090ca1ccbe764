"""What every stage shares: errors, validation of config values, atomic file writes, devices, config
helpers, the summary tables and W&B runs. Nothing here imports Lightning at module level."""
