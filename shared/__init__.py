"""The render farm's domain: settings, models, parameters, pricing, credits, jobs and storage."""
