-- Device registry: who may connect. Secrets are random 256-bit values shown
-- once at registration; only their SHA-256 is stored (a slow password hash
-- adds nothing for high-entropy secrets and would turn a reconnect storm
-- into a CPU storm).
CREATE TABLE devices (
    phy_id      text PRIMARY KEY CHECK (phy_id ~ '^[A-Za-z0-9._-]{1,64}$'),
    secret_hash bytea NOT NULL CHECK (length(secret_hash) = 32),
    enabled     boolean NOT NULL DEFAULT true,
    labels      jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(labels) = 'object'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX devices_labels_idx ON devices USING gin (labels jsonb_path_ops);
