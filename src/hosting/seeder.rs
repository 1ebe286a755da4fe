//! The real [`SeedWriter`]: `seed::write` into the VM's directory.

use std::path::Path;

use async_trait::async_trait;

use super::ports::{PortError, SeedWriter};
use crate::seed::SeedSpec;

#[derive(Debug, Default, Clone)]
pub struct IsoSeeder;

#[async_trait]
impl SeedWriter for IsoSeeder {
    async fn write(&self, spec: &SeedSpec, path: &Path) -> Result<(), PortError> {
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        crate::seed::write(spec, path).await?;
        Ok(())
    }

    async fn remove(&self, path: &Path) -> Result<(), PortError> {
        match tokio::fs::remove_file(path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}
