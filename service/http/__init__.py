"""HTTP plumbing shared by the routes: request bodies under limits (:mod:`.body`), the header deadline
(:mod:`.protocol`), HTTPS (:mod:`.tls`), RFC 9457 problem documents (:mod:`.problems`, the one place
errors become HTTP responses), response models (:mod:`.schemas`) and the app's Prometheus metrics
(:mod:`.metrics`)."""
