use gemini_balancer::{settings, startup::Application, telemetry};

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    let settings = match settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gemini-balancer: configuration error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // `gemini-balancer healthcheck`: for container HEALTHCHECKs in images
    // without curl.
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return match gemini_balancer::startup::probe_health(settings.listen) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gemini-balancer: unhealthy: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    telemetry::init(settings.log_format);
    let result = async {
        Application::build(settings)
            .await?
            .run_until_stopped()
            .await
    }
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("gemini-balancer: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
