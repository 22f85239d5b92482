"""Forward-only migrations, applied in order and recorded in ``_migrations``."""

from __future__ import annotations


def m001_initial() -> list[str]:
    return [
        """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
        """CREATE TABLE teams (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            credits INTEGER NOT NULL DEFAULT 0 CHECK (credits >= 0),
            plan TEXT NOT NULL DEFAULT 'self-hosted',
            customer_id TEXT,
            max_concurrent_trainings INTEGER NOT NULL DEFAULT 10,
            rate_limit_per_minute INTEGER,
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE users (
            id TEXT PRIMARY KEY,
            team_id TEXT NOT NULL REFERENCES teams(id),
            email TEXT,
            role TEXT NOT NULL DEFAULT 'owner',
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            team_id TEXT NOT NULL REFERENCES teams(id),
            user_id TEXT NOT NULL REFERENCES users(id),
            name TEXT NOT NULL,
            prefix TEXT NOT NULL,
            digest BLOB NOT NULL UNIQUE,
            active INTEGER NOT NULL DEFAULT 1,
            created_at REAL NOT NULL,
            revoked_at REAL
        )""",
        """CREATE TABLE loras (
            id TEXT PRIMARY KEY,
            team_id TEXT NOT NULL REFERENCES teams(id),
            user_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            name TEXT NOT NULL,
            subject_kind TEXT NOT NULL,
            gender TEXT, ethnicity TEXT, age TEXT,
            status TEXT NOT NULL,
            image_count INTEGER NOT NULL,
            steps INTEGER NOT NULL,
            lora_rank INTEGER NOT NULL,
            trigger_word TEXT NOT NULL,
            error TEXT,
            webhook_url TEXT,
            webhook_events TEXT NOT NULL DEFAULT 'completed,failed',
            stage TEXT NOT NULL DEFAULT 'prepare',
            next_run_at REAL NOT NULL,
            lease_owner TEXT,
            lease_expires REAL,
            attempts_used INTEGER NOT NULL DEFAULT 0,
            portable INTEGER NOT NULL DEFAULT 1,
            artifact_id TEXT,
            created_at REAL NOT NULL,
            started_at REAL,
            completed_at REAL,
            archived_at REAL,
            updated_at REAL NOT NULL
        )""",
        "CREATE INDEX loras_team_created ON loras (team_id, created_at DESC, id DESC)",
        "CREATE INDEX loras_due ON loras (next_run_at) WHERE status IN ('PENDING','UPLOADING','TRAINING')",
        "CREATE UNIQUE INDEX loras_live_trigger ON loras (trigger_word) WHERE status NOT IN ('FAILED','ARCHIVED')",
        """CREATE TABLE attempts (
            id TEXT PRIMARY KEY,
            owner_kind TEXT NOT NULL,           -- 'lora' | 'job'
            owner_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            provider TEXT NOT NULL,
            provider_ref TEXT,
            provider_trigger_word TEXT,
            state TEXT NOT NULL,                -- submitting | queued | running | succeeded | failed | cancelled | superseded
            progress REAL,
            error TEXT,
            retryable INTEGER NOT NULL DEFAULT 0,
            cost REAL,
            currency TEXT,
            polls INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            submitted_at REAL,
            progressed_at REAL,
            finished_at REAL,
            UNIQUE (owner_kind, owner_id, seq)
        )""",
        "CREATE INDEX attempts_owner ON attempts (owner_kind, owner_id, seq)",
        "CREATE INDEX attempts_ref ON attempts (provider, provider_ref)",
        """CREATE TABLE artifacts (
            id TEXT PRIMARY KEY,
            lora_id TEXT NOT NULL UNIQUE REFERENCES loras(id),
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            format TEXT NOT NULL,
            storage_key TEXT NOT NULL,
            source_url TEXT,
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            team_id TEXT NOT NULL REFERENCES teams(id),
            user_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            lora_id TEXT NOT NULL,
            model TEXT NOT NULL,
            status TEXT NOT NULL,
            progress INTEGER,
            input TEXT NOT NULL,                -- the request as received (JSON)
            error TEXT,
            credit_cost INTEGER NOT NULL,
            webhook_url TEXT,
            webhook_events TEXT,
            webhook_status TEXT,
            stage TEXT NOT NULL DEFAULT 'start',
            next_run_at REAL NOT NULL,
            lease_owner TEXT,
            lease_expires REAL,
            attempts_used INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            started_at REAL,
            completed_at REAL,
            updated_at REAL NOT NULL
        )""",
        "CREATE INDEX jobs_team_created ON jobs (team_id, created_at DESC, id DESC)",
        "CREATE INDEX jobs_due ON jobs (next_run_at) WHERE status IN ('QUEUED','PROCESSING')",
        """CREATE TABLE job_images (
            job_id TEXT NOT NULL REFERENCES jobs(id),
            idx INTEGER NOT NULL,
            storage_key TEXT NOT NULL,
            format TEXT NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            PRIMARY KEY (job_id, idx)
        )""",
        """CREATE TABLE ledger (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            team_id TEXT NOT NULL REFERENCES teams(id),
            amount INTEGER NOT NULL,
            reason TEXT NOT NULL,
            ref TEXT NOT NULL,
            kind TEXT NOT NULL,
            created_at REAL NOT NULL,
            UNIQUE (ref, kind)
        )""",
        "CREATE INDEX ledger_team ON ledger (team_id, id)",
        # the ledger is append-only
        """CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
           BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END""",
        """CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
           BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END""",
    ]


def m002_durability() -> list[str]:
    return [
        # Idempotency-Key: (team, key) -> what the first request was and what it created
        """CREATE TABLE idempotency (
            team_id TEXT NOT NULL,
            key TEXT NOT NULL,
            route TEXT NOT NULL,
            request_digest TEXT NOT NULL,
            object_id TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (team_id, key)
        )""",
        "CREATE INDEX idempotency_created ON idempotency (created_at)",
        # outbound webhooks: one row per delivery, kept across retries
        """CREATE TABLE deliveries (
            id TEXT PRIMARY KEY,
            team_id TEXT NOT NULL,
            key_id TEXT NOT NULL,               -- whose sha256 signs it
            owner_kind TEXT NOT NULL,           -- 'lora' | 'job'
            owner_id TEXT NOT NULL,
            event TEXT NOT NULL,
            dedup TEXT NOT NULL UNIQUE,         -- one delivery per (object, event[, progress])
            url TEXT NOT NULL,
            payload BLOB NOT NULL,
            terminal INTEGER NOT NULL,          -- decides the job's webhookStatus
            status TEXT NOT NULL,               -- pending | delivered | failed
            attempts INTEGER NOT NULL DEFAULT 0,
            next_try_at REAL NOT NULL,
            lease_owner TEXT,
            lease_expires REAL,
            last_status_code INTEGER,
            last_error TEXT,
            created_at REAL NOT NULL,
            delivered_at REAL
        )""",
        "CREATE INDEX deliveries_due ON deliveries (next_try_at) WHERE status = 'pending'",
        "CREATE INDEX deliveries_team ON deliveries (team_id, created_at DESC)",
        """CREATE TABLE delivery_attempts (
            delivery_id TEXT NOT NULL REFERENCES deliveries(id),
            attempt INTEGER NOT NULL,
            at REAL NOT NULL,
            status_code INTEGER,
            error TEXT,
            duration_ms INTEGER NOT NULL,
            PRIMARY KEY (delivery_id, attempt)
        )""",
    ]


def m004_webhook_deliveries() -> list[str]:
    return [
        # bumped by every admin replay: a try in flight when one arrives leaves the delivery due again
        "ALTER TABLE deliveries ADD COLUMN replays INTEGER NOT NULL DEFAULT 0",
        # leases are released by owner when a process stops
        "CREATE INDEX deliveries_lease_owner ON deliveries (lease_owner) WHERE lease_owner IS NOT NULL",
    ]


def m003_engine() -> list[str]:
    return [
        # the crash budget: unexpected errors a row has hit (it ends FAILED after engine.max_crashes)
        "ALTER TABLE loras ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0",
        # per-attempt counters of their own (polls counts status polls in the current state only)
        "ALTER TABLE attempts ADD COLUMN lookups INTEGER NOT NULL DEFAULT 0",  # reconcile lookups
        "ALTER TABLE attempts ADD COLUMN fetches INTEGER NOT NULL DEFAULT 0",  # result copy tries
        "UPDATE loras SET stage = 'finish' WHERE stage = 'fetch'",
        # durable cancel requests: one per attempt, worked through by the engine until the
        # vendor confirms (or says it had already ended)
        """CREATE TABLE cancels (
            attempt_id TEXT PRIMARY KEY REFERENCES attempts(id),
            owner_kind TEXT NOT NULL,           -- 'lora' | 'job'
            owner_id TEXT NOT NULL,
            provider TEXT NOT NULL,
            provider_ref TEXT,                  -- NULL until known (a submit still in flight)
            reason TEXT NOT NULL,
            state TEXT NOT NULL,                -- pending | done | abandoned
            tries INTEGER NOT NULL DEFAULT 0,
            next_try_at REAL NOT NULL,
            lease_owner TEXT,
            lease_expires REAL,
            last_error TEXT,
            created_at REAL NOT NULL,
            finished_at REAL
        )""",
        "CREATE INDEX cancels_due ON cancels (next_try_at) WHERE state = 'pending'",
        # one row per process running the engine, beaten every few seconds (for /readyz)
        """CREATE TABLE engine_workers (
            owner TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started_at REAL NOT NULL,
            beat_at REAL NOT NULL
        )""",
    ]


def m005_provider_contract() -> list[str]:
    return [
        # the attempt that trained a READY LoRA: generation uses its provider, job id and vendor
        # trigger word, whatever attempts come later
        "ALTER TABLE loras ADD COLUMN trained_attempt_id TEXT",
        # storage keys (JSON list) of the sample images a provider without weights returned
        "ALTER TABLE loras ADD COLUMN sample_keys TEXT",
        # generation parameters the client set that the provider serving the job ignores (JSON list)
        "ALTER TABLE jobs ADD COLUMN ignored_params TEXT",
        # when an unverifiable callback last made this attempt's poll due (rate limit)
        "ALTER TABLE attempts ADD COLUMN hinted_at REAL",
    ]


def m006_routing() -> list[str]:
    return [
        # one breaker per provider instance and operation, shared by every process
        """CREATE TABLE provider_health (
            instance TEXT NOT NULL,
            operation TEXT NOT NULL,            -- training | inference
            state TEXT NOT NULL,                -- closed | open
            failures INTEGER NOT NULL DEFAULT 0,
            opened_at REAL,
            probe_attempt TEXT,
            probe_expires REAL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (instance, operation)
        )""",
        # provider calls per instance, operation and minute (success rate and latency)
        """CREATE TABLE provider_calls (
            instance TEXT NOT NULL,
            operation TEXT NOT NULL,
            minute INTEGER NOT NULL,
            calls INTEGER NOT NULL,
            failures INTEGER NOT NULL,
            total_ms REAL NOT NULL,
            PRIMARY KEY (instance, operation, minute)
        )""",
        # a team's own routes (JSON: {training?: route, inference?: route}), set with the CLI
        "ALTER TABLE teams ADD COLUMN routing TEXT",
        # the instance a request asked for (X-Gateway-Provider), honoured when eligible and healthy
        "ALTER TABLE loras ADD COLUMN preferred_provider TEXT",
        "ALTER TABLE jobs ADD COLUMN preferred_provider TEXT",
        "CREATE INDEX attempts_cost ON attempts (owner_kind, provider, submitted_at)",
    ]


MIGRATIONS = [m001_initial, m002_durability, m003_engine, m004_webhook_deliveries, m005_provider_contract,
              m006_routing]
