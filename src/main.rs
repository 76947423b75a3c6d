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
